"""The manager's line policy, driven step by step: no threads, no runtime, no waiting."""

from __future__ import annotations

from pathlib import Path

import pytest

from rkllm_core._sync import Waiter
from rkllm_core.errors import BusyError
from rkllm_core.models.line import LinePolicy, LoadedModel, Request, RequestState
from rkllm_core.models.registry import ModelInfo, ModelRegistry
from rkllm_core.params import InitParams
from rkllm_core.sim import make_model


class FakeRuntime:
    """What the policy reads of a handle: whether its user closed it."""

    closed = False


@pytest.fixture
def infos(tmp_path: Path) -> dict[str, ModelInfo]:
    make_model(tmp_path, "Qwen3-0.6B-w8a8-rk3588.rkllm", size_mb=100)
    make_model(tmp_path, "gemma-3-270m-it_w8a8.rkllm", size_mb=50)
    make_model(tmp_path, "gemma-3-1b-it_w8a8.rkllm", size_mb=300)
    reg = ModelRegistry([tmp_path], platform=None)
    return {n: reg.get(n) for n in ("qwen3-0.6b", "gemma3-270m", "gemma3-1b")}


def request(info: ModelInfo, owner: str, chain: set[LoadedModel] | None = None) -> Request:
    return Request(info, InitParams(), Waiter(owner=owner), chain or set())


def loaded(policy: LinePolicy, info: ModelInfo) -> LoadedModel:
    """Put a loaded instance of ``info`` in the policy, as a finished load would."""
    entry = LoadedModel(info=info, init=InitParams(), runtime=FakeRuntime(), estimated_mb=policy.estimate_mb(info))  # type: ignore[arg-type]
    policy.entries[entry.key] = entry
    return entry


def test_a_swap_serves_its_requests_in_arrival_order(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    qwen = loaded(policy, infos["qwen3-0.6b"])
    a, b, c = (request(infos["gemma3-270m"], who) for who in "abc")
    for r in (a, b, c):
        policy.arrive(r)
        policy.pump()
    assert policy.take_action(a) == ("unload", [qwen]) and policy.dying == {qwen}
    assert b.state is c.state is RequestState.WAITING and policy.take_action(b) is None
    policy.unloaded(a)
    assert policy.pump().grants == [] and a.action is None  # qwen's handle is not destroyed yet: no load
    policy.destroyed(qwen)
    policy.pump()
    kind, entry = policy.take_action(a) or ("", None)
    assert kind == "load" and isinstance(entry, LoadedModel)
    assert policy.pump().grants == []  # nothing is granted while it loads
    policy.loaded(a, entry, FakeRuntime(), 0.4)  # type: ignore[arg-type]
    assert policy.pump().grants == [a, b, c]
    assert entry.leases == 3 and a.loaded and not b.loaded


def test_the_budget_counts_a_handle_until_it_is_destroyed(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=2, memory_budget_mb=None)
    qwen = loaded(policy, infos["qwen3-0.6b"])
    loaded(policy, infos["gemma3-270m"])
    policy.retire([qwen])  # e.g. unload() took it out of service; its destroy is under way
    r = request(infos["gemma3-1b"], "x")
    policy.arrive(r)
    policy.pump()
    assert r.action is None and r.error is None
    policy.destroyed(qwen)
    policy.pump()
    assert r.action is not None and r.action[0] == "load"


def test_a_memory_budget_counts_dying_models_too(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=None, memory_budget_mb=350)
    gemma1b = loaded(policy, infos["gemma3-1b"])  # 300 MB
    policy.retire([gemma1b])
    r = request(infos["qwen3-0.6b"], "x")  # 100 MB: fits beside nothing, not beside a dying 300 MB
    policy.arrive(r)
    policy.pump()
    assert r.action is None
    policy.destroyed(gemma1b)
    policy.pump()
    assert r.action is not None


def test_a_closed_handle_is_retired_and_reloaded_later(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    qwen = loaded(policy, infos["qwen3-0.6b"])
    assert qwen.runtime is not None
    qwen.runtime.closed = True  # type: ignore[misc]
    assert policy.closed_by_user() == [qwen] and policy.dying == {qwen} and not policy.entries
    r = request(infos["qwen3-0.6b"], "x")
    policy.arrive(r)
    policy.pump()
    assert r.action is None
    policy.destroyed(qwen)
    policy.pump()
    assert r.action is not None and r.action[0] == "load"


def test_a_request_its_own_chain_blocks_is_refused_at_once(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    qwen = loaded(policy, infos["qwen3-0.6b"])
    qwen.holders["me"] += 1
    with pytest.raises(BusyError) as err:
        policy.arrive(request(infos["gemma3-270m"], "me", chain={qwen}))
    assert err.value.reason == "deadlock" and not policy.line
    # the same chain asking for the model it holds is served at once, even behind a swap
    other = request(infos["gemma3-270m"], "other")
    policy.arrive(other)
    policy.pump()
    mine = request(infos["qwen3-0.6b"], "me", chain={qwen})
    policy.arrive(mine)
    assert policy.pump().grants == [mine]


def test_a_swap_drains_its_victim_and_later_requests_wait_behind_it(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    qwen = loaded(policy, infos["qwen3-0.6b"])
    qwen.holders["runner"] += 1
    swap = request(infos["gemma3-270m"], "swapper")
    policy.arrive(swap)
    policy.pump()
    assert swap.action is None and swap.victims == [qwen]
    late = request(infos["qwen3-0.6b"], "late")
    policy.arrive(late)
    assert policy.pump().grants == []  # qwen is draining for the earlier swap
    policy.release(qwen, "runner")
    policy.pump()
    assert swap.action == ("unload", [qwen]) and late.state is RequestState.WAITING


def test_a_swap_whose_blockers_all_wait_in_line_is_refused(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    qwen = loaded(policy, infos["qwen3-0.6b"])
    qwen.holders["holder"] += 1
    swap = request(infos["gemma3-270m"], "swapper")
    policy.arrive(swap)
    policy.pump()
    assert swap.error is None
    stuck = request(infos["gemma3-1b"], "holder")  # the holder now waits in line itself
    policy.arrive(stuck)
    decision = policy.pump()
    assert isinstance(swap.error, BusyError) and swap.error.reason == "deadlock"
    assert swap.waiter in decision.wake


def test_a_failed_load_answers_everyone_waiting_for_that_instance(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    first, second = request(infos["gemma3-1b"], "a"), request(infos["gemma3-1b"], "b")
    other = request(infos["qwen3-0.6b"], "c")
    for r in (first, second, other):
        policy.arrive(r)
    policy.pump()
    action = policy.take_action(first)
    assert action is not None and action[0] == "load"
    entry = action[1]
    assert isinstance(entry, LoadedModel)
    boom = RuntimeError("init failed")
    woken = policy.load_failed(entry, boom)
    assert first.error is boom and second.error is boom and other.error is None
    assert set(woken) == {first.waiter, second.waiter}
    for r in (first, second):
        policy.leave(r)
    policy.pump()
    assert other.action is not None and other.action[0] == "load"


def test_leaving_undoes_an_assignment_nobody_will_do(infos: dict[str, ModelInfo]) -> None:
    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    qwen = loaded(policy, infos["qwen3-0.6b"])
    r = request(infos["gemma3-270m"], "x")
    policy.arrive(r)
    policy.pump()
    assert r.action == ("unload", [qwen]) and qwen in policy.dying
    policy.leave(r)  # cancelled before it took the action
    assert policy.entries == {qwen.key: qwen} and not policy.dying and policy.acting is None


def test_reload_drains_the_slot_then_loads_it_with_the_new_settings(infos: dict[str, ModelInfo]) -> None:
    from rkllm_core.params import SamplingParams

    policy = LinePolicy(max_loaded=2, memory_budget_mb=None)
    info = infos["qwen3-0.6b"]
    cold = InitParams(sampling=SamplingParams(temperature=0.1))
    hot = InitParams(sampling=SamplingParams(temperature=1.2))
    slot = InitParams()
    entry = LoadedModel(info=info, init=cold, slot=slot, runtime=FakeRuntime())  # type: ignore[arg-type]
    policy.entries[entry.key] = entry
    entry.holders["runner"] += 1
    want_hot = Request(info, hot, Waiter(owner="hot"), set(), slot)
    late_cold = Request(info, cold, Waiter(owner="cold"), set(), slot)
    for r in (want_hot, late_cold):
        policy.arrive(r)
    assert policy.pump().grants == [] and want_hot.victims == [entry]  # draining: the cold request waits behind
    policy.release(entry, "runner")
    policy.pump()
    assert want_hot.action == ("unload", [entry]) and entry in policy.dying
    policy.take_action(want_hot)
    policy.unloaded(want_hot)
    policy.destroyed(entry)
    policy.pump()
    action = policy.take_action(want_hot)
    assert action is not None and action[0] == "load" and isinstance(action[1], LoadedModel)
    reloaded = action[1]
    assert reloaded.init == hot and reloaded.key == entry.key
    policy.loaded(want_hot, reloaded, FakeRuntime(), 0.1)  # type: ignore[arg-type]
    assert policy.pump().grants == [want_hot]
    assert late_cold.action is None  # its turn comes once the hot request lets go: a reload back
    policy.release(reloaded, "hot")
    policy.pump()
    assert late_cold.action == ("unload", [reloaded])


def test_a_reload_of_a_slot_the_chain_holds_is_refused(infos: dict[str, ModelInfo]) -> None:
    from rkllm_core.params import SamplingParams

    policy = LinePolicy(max_loaded=1, memory_budget_mb=None)
    info = infos["qwen3-0.6b"]
    entry = LoadedModel(info=info, init=InitParams(), slot=InitParams(), runtime=FakeRuntime())  # type: ignore[arg-type]
    policy.entries[entry.key] = entry
    entry.holders["me"] += 1
    hot = InitParams(sampling=SamplingParams(temperature=1.2))
    mine = Request(info, hot, Waiter(owner="me"), {entry}, InitParams())
    policy.arrive(mine)
    policy.pump()
    assert isinstance(mine.error, BusyError) and mine.error.reason == "deadlock"
