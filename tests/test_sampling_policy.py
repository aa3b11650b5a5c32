"""Runtime 1.2 without extra model copies: max_tokens per run, and the sampling policy users choose."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.options import ChatOptions
from rkllm_core.errors import InvalidParameterError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.params import InitParams, SamplingParams
from rkllm_core.sim import SimulatorControl, make_model

MODEL = "qwen3-0.6b"
COLD, HOT = SamplingParams(temperature=0.1), SamplingParams(temperature=1.2)


@pytest.fixture
def make_manager(
    model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl
) -> Iterator[Callable[..., ModelManager]]:
    make_model(model_dir, "Qwen3-0.6B-w8a8-rk3588.rkllm", size_mb=1)
    made: list[ModelManager] = []

    def factory(toml: str = "", **kwargs: object) -> ModelManager:
        if toml:
            (model_dir / "rkllm-models.toml").write_text(toml, encoding="utf-8")
        m = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, **kwargs)  # type: ignore[arg-type]
        made.append(m)
        return m

    yield factory
    for m in made:
        m.close()


def inits(sim: SimulatorControl) -> list[dict[str, object]]:
    return [t for t in sim.trace() if t["fn"] == "rkllm_init"]


def test_twenty_max_tokens_values_share_one_instance(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl, abi: str
) -> None:
    """20 requests, 20 limits, one init; each stops at its own limit, counted exactly; the next turn is right."""
    engine = ChatEngine(manager=make_manager(), prompt_cache=False)
    sim.set("token_delay_ms", 1)
    sim.set("trace", 1)
    msgs = [ChatMessage("user", "count to 300")]
    for limit in range(1, 21):
        reply = engine.chat(MODEL, msgs, ChatOptions(max_new_tokens=limit))
        assert reply.finish_reason == "length" and reply.usage.output_tokens == limit
    assert sim.counter("inits") == 1
    (init,) = inits(sim)
    if abi == "1.2":  # initialised with its largest useful limit: the whole context
        assert init["max_new_tokens"] == init["max_context_len"]
    # The next turn: on 1.3 the runtime's own limit leaves the cache exact and it is reused; on 1.2
    # the binding's cut may leave a token past it in the cache, so the handle claims nothing and
    # the conversation is rebuilt, answered as if it had been reused.
    nxt = [*msgs, reply.message, ChatMessage("user", "count to 3")]
    again = engine.chat(MODEL, nxt, ChatOptions(max_new_tokens=50))
    assert again.kv_reused == (abi == "1.3")
    assert again.finish_reason == "stop" and again.message.content == "1 2 3"
    assert sim.counter("inits") == 1


def test_instance_policy_keeps_one_instance_per_setting(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl, abi: str
) -> None:
    m = make_manager(max_loaded=2, sampling_policy="instance")
    for sampling in (COLD, HOT, COLD, HOT):
        with m.lease(MODEL, InitParams(sampling=sampling)) as lease:
            lease.runtime.generate("x")
            assert lease.sampling_policy == ("instance" if abi == "1.2" else "run")
    assert sim.counter("inits") == (2 if abi == "1.2" else 1)
    assert len(m.loaded()) == (2 if abi == "1.2" else 1)


def test_reload_policy_reinitialises_the_one_instance(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl, abi: str
) -> None:
    m = make_manager(max_loaded=2)  # reload is the default
    sim.set("trace", 1)
    sim.reset()
    for sampling in (COLD, COLD, HOT, COLD):
        with m.lease(MODEL, InitParams(sampling=sampling)) as lease:
            lease.runtime.generate("x")
            assert lease.sampling_policy == ("reload" if abi == "1.2" else "run")
            if abi == "1.2":
                assert lease.init.sampling.temperature == sampling.temperature
    if abi == "1.2":
        assert [round(float(str(t["temperature"])), 3) for t in inits(sim)] == [0.1, 1.2, 0.1]
        assert sim.counter("max_resident_handles") == 1  # never two copies, although the budget allows it
    else:
        assert sim.counter("inits") == 1


def test_reload_under_concurrency_serves_every_request_its_own_sampling(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl, abi: str
) -> None:
    m = make_manager(max_loaded=1)
    sim.reset()
    errors: list[BaseException] = []
    wrong: list[float | None] = []

    def worker(temperature: float) -> None:
        try:
            for _ in range(5):
                with m.lease(MODEL, InitParams(sampling=SamplingParams(temperature=temperature)), timeout=60) as lease:
                    if abi == "1.2" and lease.init.sampling.temperature != temperature:
                        wrong.append(lease.init.sampling.temperature)
                    lease.runtime.generate("x")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0.1, 0.5, 0.9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not wrong
    assert sim.counter("max_resident_handles") <= 1 and m.waiting() == 0


def test_fixed_policy_serves_with_the_models_own_sampling(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl, abi: str, caplog: pytest.LogCaptureFixture
) -> None:
    m = make_manager('[models."qwen3-0.6b"]\ntemperature = 0.3\nsampling_policy = "fixed"\n', max_loaded=2)
    engine = ChatEngine(manager=m, prompt_cache=False)
    sim.set("trace", 1)
    with caplog.at_level(logging.WARNING, logger="rkllm_core.models.manager"):
        for sampling in (COLD, HOT, COLD, HOT):
            reply = engine.chat(MODEL, [ChatMessage("user", "hi")], ChatOptions(sampling=sampling))
            assert reply.sampling_policy == ("fixed" if abi == "1.2" else "run")
    assert sim.counter("inits") == 1
    if abi == "1.2":
        assert abs(float(str(inits(sim)[0]["temperature"])) - 0.3) < 1e-6
        ignored = [r for r in caplog.records if "ignored" in r.getMessage()]
        assert len(ignored) == 2  # once per distinct setting
    else:
        assert not caplog.records


def test_a_bad_policy_is_refused(make_manager: Callable[..., ModelManager]) -> None:
    with pytest.raises(InvalidParameterError, match="sampling_policy"):
        make_manager(sampling_policy="sometimes")
    m = make_manager('[models."qwen3-0.6b"]\nsampling_policy = "often"\ntemperature = 0.4\n')
    info = m.resolve(MODEL)
    assert info.defaults.sampling_policy is None and info.defaults.sampling.temperature == 0.4  # only that value


def test_both_adapters_report_the_policy_and_stop_at_max_tokens(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl, abi: str
) -> None:
    from llama_index.core.llms import ChatMessage as LIMessage

    from langchain_rkllm import ChatRKLLM
    from llamaindex_rkllm import RKLLM

    m = make_manager(sampling_policy="fixed")
    expected = "fixed" if abi == "1.2" else "run"
    for limit in (3, 7):
        lc = ChatRKLLM(model=MODEL, manager=m, max_tokens=limit, temperature=0.5).invoke("count to 300")
        assert lc.response_metadata["sampling_policy"] == expected
        assert lc.response_metadata["finish_reason"] == "length" and lc.usage_metadata["output_tokens"] == limit
        li = RKLLM(model=MODEL, manager=m, max_new_tokens=limit).chat([LIMessage(role="user", content="count to 300")])
        assert li.raw["sampling_policy"] == expected and li.raw["usage"]["completion_tokens"] == limit
    assert sim.counter("inits") == 1
