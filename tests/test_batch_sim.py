"""The simulator's n_batch contract, driven through raw ctypes with the binding's own structs."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.native.backend import Backend
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.structs import LLMCallState, LLMHandle, LLMResultCallback, RKLLMPerfStat, RKLLMResult
from rkllm_core.params import InitParams
from rkllm_core.sim import SimulatorControl

NORMAL = int(LLMCallState.RKLLM_RUN_NORMAL)
WAITING = int(LLMCallState.RKLLM_RUN_WAITING)
FINISH = int(LLMCallState.RKLLM_RUN_FINISH)
STRIDE = ctypes.sizeof(RKLLMResult)


def ntok(text: str) -> int:
    """The simulator's token count of a reply (4-byte tokens)."""
    return -(-len(text.encode()) // 4)


@dataclass
class Steps:
    """Every callback of a run: (state, [(token_id, text or None, perf copy)] for each of n results)."""

    n: int
    calls: list[tuple[int, list[tuple[int, bytes | None, RKLLMPerfStat]]]] = field(default_factory=list)
    pause_at: int = -1

    def __call__(self, result: int, userdata: int, state: int) -> int:
        rows = []
        for i in range(self.n):
            r = RKLLMResult.from_buffer_copy(ctypes.string_at(result + i * STRIDE, STRIDE))
            text = ctypes.string_at(r.text) if r.text else None
            rows.append((int(r.token_id), text, r.perf))
        self.calls.append((state, rows))
        return 1 if len(self.calls) == self.pause_at else 0

    def texts(self) -> list[str]:
        out = [b""] * self.n
        for state, rows in self.calls:
            for i, (token, text, _perf) in enumerate(rows):
                if state in (NORMAL, WAITING) and token >= 0 and text:
                    out[i] += text
        return [t.decode() for t in out]


@dataclass
class Raw:
    lib: RuntimeLibrary
    backend: Backend
    handle: int
    steps: Steps
    keep: tuple[Any, ...]

    def run(self, prompts: list[str], keep_history: int = 0, max_new_tokens: int | None = None) -> int:
        reqs = [self.backend.run_request(p, max_new_tokens=max_new_tokens) for p in prompts]
        inputs, infer, _keep = self.backend.batch_structs(reqs)
        infer.keep_history = keep_history
        return self.backend.run(self.handle, inputs, infer, 0)


@pytest.fixture
def raw(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_path: Path) -> Iterator[Any]:
    sim.set("batch_finish", 0)
    sim.set("batch_step_cost", 0.15)
    made: list[Raw] = []

    def make(n: int) -> Raw:
        backend = sim_lib.backend
        steps = Steps(n)
        cb = LLMResultCallback(steps)
        param = backend.default_param()
        path = os.fsencode(model_path)
        param.model_path = path
        backend.apply_init(param, InitParams(n_batch=n))
        handle = LLMHandle()
        if sim_lib.abi == "1.3":
            cbs = sim_lib.functions.rkllm_init.argtypes[2]._type_()
            cbs.result_callback = cb
            rc = sim_lib.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(cbs))
            keep: tuple[Any, ...] = (cb, cbs, param, path)
        else:
            rc = sim_lib.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), cb)
            keep = (cb, param, path)
        assert rc == 0
        made.append(Raw(sim_lib, backend, int(handle.value or 0), steps, keep))
        return made[-1]

    yield make
    for r in made:
        assert r.backend.destroy(r.handle) == 0
    sim.set("batch_finish", 0)


def test_each_step_is_an_array_and_finished_slots_are_negative(raw: Any, sim: SimulatorControl) -> None:
    r = raw(3)
    prompts = ["count to 3", "count to 12", "a longer prompt for the third slot"]
    assert r.run(prompts) == 0
    steps = [rows for state, rows in r.steps.calls if state in (NORMAL, WAITING)]
    lengths = [ntok(t) for t in r.steps.texts()]
    assert r.steps.texts()[:2] == ["1 2 3", " ".join(map(str, range(1, 13)))]
    assert r.steps.texts()[2] == "Echo: a longer prompt for the third slot — ok."
    assert len(steps) == sim.counter("batch_steps") == max(lengths)
    for k, rows in enumerate(steps):  # slot 0 finished after its 2 tokens: -1 and NULL text from then on
        token, text, _ = rows[0]
        assert (token < 0) == (k >= lengths[0])
        if token < 0:
            assert text is None
    state, rows = r.steps.calls[-1]
    assert state == FINISH and [row[0] for row in rows] == [-1, -1, -1]
    assert [row[2].generate_tokens for row in rows] == lengths
    assert sim.counter("batched_runs") == 1 and sim.counter("batch_refusals") == 0


def test_finish_as_a_single_result_puts_poison_after_it(raw: Any, sim: SimulatorControl) -> None:
    sim.set("batch_finish", 1)
    r = raw(2)
    assert r.run(["one", "two"]) == 0
    state, rows = r.steps.calls[-1]
    assert state == FINISH
    assert rows[0][0] == -1 and rows[0][2].generate_tokens == sum(ntok(t) for t in r.steps.texts())
    assert rows[1][1] == b"[[sim:poison]]"  # a binding reading FINISH as an array would deliver this


def test_no_finish_callback_with_shape_2(raw: Any, sim: SimulatorControl) -> None:
    sim.set("batch_finish", 2)
    r = raw(2)
    assert r.run(["one", "two"]) == 0
    assert all(state != FINISH for state, _rows in r.steps.calls)
    assert r.steps.texts() == ["Echo: one — ok.", "Echo: two — ok."]


def test_keep_history_is_refused_in_a_batch(raw: Any, sim: SimulatorControl) -> None:
    r = raw(2)
    assert r.run(["one", "two"], keep_history=1) == -1
    assert r.steps.calls == []
    assert sim.counter("batch_refusals") == 1 and sim.counter("errors") == 1


def test_kv_cache_sizes_and_clear_are_per_slot(raw: Any, sim: SimulatorControl) -> None:
    r = raw(3)
    r.steps.pause_at = 1  # pause after the first step: every slot's cache is kept
    assert r.run(["a", "a much longer prompt than the first", "mid prompt"]) == 0
    sizes = (ctypes.c_int * 4)(-7, -7, -7, -7)
    assert r.lib.functions.rkllm_get_kv_cache_size(r.handle, sizes) == 0
    assert sizes[3] == -7  # exactly n_batch ints
    assert sizes[0] < sizes[2] < sizes[1] and min(sizes[:3]) > 0
    before = list(sizes[:3])
    start, end = (ctypes.c_int * 3)(0, 2, 0), (ctypes.c_int * 3)(0, 5, 0)
    assert r.lib.functions.rkllm_clear_kv_cache(r.handle, 0, start, end) == 0
    assert r.lib.functions.rkllm_get_kv_cache_size(r.handle, sizes) == 0
    assert list(sizes[:3]) == [0, before[1] - 3, 0]  # a range in slot 1; the others follow keep_system_prompt=0
    assert r.backend.kv_cache_sizes(r.handle, 3) == (0, [0, before[1] - 3, 0])


def test_step_cost_grows_with_active_slots(raw: Any, sim: SimulatorControl) -> None:
    """Read from the simulator's busy time, as a ratio of two runs (no absolute timing)."""
    sim.set("token_delay_ms", 2)
    r = raw(4)
    sim.reset()
    assert r.run(["count to 40"] * 4) == 0
    four = sim.counter("busy_ns")
    sim.set("batch_step_cost", 1.0)
    sim.reset()
    assert r.run(["count to 40"] * 4) == 0
    assert sim.counter("busy_ns") > four * 1.5  # 4 active slots: 1.45x vs 4x the single-slot step


def test_n_batch_above_100_is_an_init_error(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_path: Path) -> None:
    from rkllm_core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="n_batch"):
        InitParams(n_batch=101)  # the binding refuses it before any native call
    backend = sim_lib.backend
    param = backend.default_param()
    path = os.fsencode(model_path)
    param.model_path = path
    backend.apply_init(param, InitParams(n_batch=100))
    param.extend_param.n_batch = 101  # and the runtime itself refuses it at init
    handle = LLMHandle()
    cb = LLMResultCallback(Steps(1))
    if sim_lib.abi == "1.3":
        cbs = sim_lib.functions.rkllm_init.argtypes[2]._type_()
        cbs.result_callback = cb
        rc = sim_lib.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(cbs))
    else:
        rc = sim_lib.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), cb)
    assert rc != 0 and not handle.value
    assert sim.counter("init_failures") == 1
