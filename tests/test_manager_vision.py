"""The manager keeps a vision model and its image encoder as one unit: loaded, counted, evicted and closed together.

Both simulators run: the RKLLM one for the language model, the RKNN one for the encoder; their
fixtures fail a test that leaks a handle or a context.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.errors import RKLLMError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.rknn import RKNNLibrary
from rkllm_core.sim import RKNNSimulatorControl, SimulatorControl, make_encoder, make_model
from rkllm_core.vision.encoder import EncoderState, ImageEncoder
from tests import rknn_fixtures

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim

VL = "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm"
ENCODER = "qwen3-vl-2b_vision_rk3588.rknn"
SHAPE: dict[str, Any] = {"height": 32, "width": 32, "tokens": 4, "embed": 6}
MiB = 1024 * 1024


@pytest.fixture
def vl_dir(model_dir: Path) -> Path:
    """A vision model (10 MB) with a 20 MB encoder, and two 10 MB text models."""
    make_model(model_dir / "vl", VL, size_mb=10)
    make_encoder(model_dir / "vl", ENCODER, size_mb=20, **SHAPE)
    make_model(model_dir, "Qwen3-0.6B-w8a8-rk3588.rkllm", size_mb=10)
    make_model(model_dir, "gemma-3-1b-it_w8a8.rkllm", size_mb=10)
    return model_dir


Factory = Callable[..., ModelManager]


@pytest.fixture
def manager_factory(
    vl_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, rknn_lib: RKNNLibrary, rknn_sim: RKNNSimulatorControl
) -> Iterator[Factory]:
    made: list[ModelManager] = []

    def factory(directory: Path = vl_dir, **options: object) -> ModelManager:
        budget: dict[str, object] = {"max_loaded": 3, "memory_budget_mb": None, **options}
        manager = ModelManager(
            ModelRegistry([directory], platform=None),
            library=sim_lib,
            rknn_library=rknn_lib,
            preflight=False,
            **budget,  # type: ignore[arg-type]
        )
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        manager.close()


def encode_once(encoder: ImageEncoder) -> int:
    return encoder.encode(bytes(encoder.pixel_spec.nbytes)).n_tokens


def test_a_vision_model_loads_with_its_encoder_and_a_text_model_without(
    manager_factory: Factory, rknn_sim: RKNNSimulatorControl
) -> None:
    manager = manager_factory()
    contexts = rknn_sim.counter("live_contexts")
    with manager.lease("qwen3-vl-2b") as lease:
        assert lease.info.kind == "vision"
        encoder = lease.encoder
        assert isinstance(encoder, ImageEncoder) and encoder.path.name == ENCODER
        assert encoder.family is not None and encoder.family.name == "qwen3-vl"
        assert encode_once(encoder) == SHAPE["tokens"]
        assert rknn_sim.counter("live_contexts") == contexts + 1
    with manager.lease("qwen3-0.6b") as text:
        assert text.encoder is None
    with manager.lease("qwen3-vl-2b") as again:  # resident: the same encoder, not a reload
        assert again.encoder is encoder
    assert rknn_sim.counter("inits") == 1


def test_the_unit_counts_the_encoder_in_its_memory(manager_factory: Factory) -> None:
    manager = manager_factory()
    with manager.lease("qwen3-vl-2b") as lease:
        assert lease.encoder is not None
        reported = lease.encoder.memory_bytes / MiB
    entry = next(e for e in manager.loaded() if e.info.name == "qwen3-vl-2b")
    assert reported >= 20
    assert entry.encoder_mb == reported
    assert entry.memory_mb == pytest.approx(10 + reported)


def test_the_encoder_is_evicted_with_its_model_under_a_memory_budget(
    manager_factory: Factory, rknn_sim: RKNNSimulatorControl
) -> None:
    # 35 MB: a 10 MB text model beside the 10 MB language model fits, but not beside it and its 20 MB encoder
    manager = manager_factory(max_loaded=None, memory_budget_mb=35)
    with manager.lease("qwen3-0.6b"):
        pass
    with manager.lease("qwen3-vl-2b") as lease:
        encoder = lease.encoder
        assert encoder is not None
    assert not manager.is_loaded("qwen3-0.6b")
    with manager.lease("qwen3-0.6b"):
        assert not manager.is_loaded("qwen3-vl-2b")
        assert encoder.state is EncoderState.CLOSED
        assert rknn_sim.counter("live_contexts") == 0


def test_unload_takes_the_encoder_with_the_model(manager_factory: Factory, rknn_sim: RKNNSimulatorControl) -> None:
    manager = manager_factory()
    with manager.lease("qwen3-vl-2b") as lease:
        encoder = lease.encoder
    assert encoder is not None and rknn_sim.counter("live_contexts") == 1
    assert manager.unload("qwen3-vl-2b") == 1
    assert encoder.state is EncoderState.CLOSED and rknn_sim.counter("destroys") == 1


def test_close_takes_the_encoder_with_the_model(manager_factory: Factory, rknn_sim: RKNNSimulatorControl) -> None:
    manager = manager_factory()
    with manager.lease("qwen3-vl-2b") as lease:
        encoder = lease.encoder
    manager.close()
    assert encoder is not None and encoder.state is EncoderState.CLOSED
    assert rknn_sim.counter("live_contexts") == 0


def test_keep_alive_expiry_takes_the_encoder_with_the_model(
    manager_factory: Factory, rknn_sim: RKNNSimulatorControl
) -> None:
    manager = manager_factory()
    with manager.lease("qwen3-vl-2b") as lease:
        encoder = lease.encoder
    assert encoder is not None
    closed = threading.Event()
    original = encoder.close

    def close(**kwargs: float) -> None:
        original(**kwargs)
        closed.set()

    encoder.close = close  # type: ignore[method-assign]  # observe the close, which still runs
    manager.keep_alive("qwen3-vl-2b", 0)
    assert closed.wait(30)
    assert encoder.state is EncoderState.CLOSED and not manager.is_loaded("qwen3-vl-2b")


def test_the_encoder_is_closed_after_the_language_models_handle(
    manager_factory: Factory, sim: SimulatorControl
) -> None:
    manager = manager_factory()
    with manager.lease("qwen3-vl-2b") as lease:
        encoder = lease.encoder
    assert encoder is not None
    seen: list[int] = []
    original = encoder.close

    def close(**kwargs: float) -> None:
        seen.append(sim.counter("live_handles"))
        original(**kwargs)

    encoder.close = close  # type: ignore[method-assign]
    manager.unload("qwen3-vl-2b")
    assert seen == [0]


def corrupt(path: Path) -> None:
    path.write_bytes(b"not an rknn model" * 64)


def test_a_corrupt_encoder_fails_the_load_and_leaves_nothing_loaded(
    manager_factory: Factory, vl_dir: Path, sim: SimulatorControl, rknn_sim: RKNNSimulatorControl
) -> None:
    corrupt(vl_dir / "vl" / ENCODER)
    manager = manager_factory()
    with pytest.raises(RKLLMError):
        manager.lease("qwen3-vl-2b")
    assert manager.loaded() == [] and manager.stats["load_failures"] == 1
    assert sim.counter("live_handles") == 0 and rknn_sim.counter("live_contexts") == 0
    with manager.lease("qwen3-0.6b") as text:  # the manager still serves
        assert text.encoder is None


def test_a_language_model_that_fails_to_load_takes_its_loaded_encoder_down(
    manager_factory: Factory, vl_dir: Path, sim: SimulatorControl, rknn_sim: RKNNSimulatorControl
) -> None:
    corrupt(vl_dir / "vl" / VL)
    manager = manager_factory()
    with pytest.raises(RKLLMError):
        manager.lease("qwen3-vl-2b")
    assert rknn_sim.counter("inits") == 1 and rknn_sim.counter("destroys") == 1
    assert rknn_sim.counter("live_contexts") == 0 and sim.counter("live_handles") == 0
    assert manager.loaded() == []


def test_a_vision_model_without_an_encoder_loads_alone(
    manager_factory: Factory, tmp_path: Path, rknn_sim: RKNNSimulatorControl
) -> None:
    alone = tmp_path / "alone"
    make_model(alone, VL, size_mb=1)
    manager = manager_factory(alone)
    with manager.lease("qwen3-vl-2b") as lease:
        assert lease.info.text_only and lease.encoder is None
    assert rknn_sim.counter("inits") == 0


def test_two_threads_use_the_vision_model_while_another_swaps_text_models(
    manager_factory: Factory, rknn_sim: RKNNSimulatorControl, sim: SimulatorControl
) -> None:
    manager = manager_factory(max_loaded=2)
    rounds = 15
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def use_vision() -> None:
        start.wait()
        for _ in range(rounds):
            with manager.lease("qwen3-vl-2b", timeout=60) as lease:
                encoder = lease.encoder
                assert encoder is not None and encoder.state is EncoderState.OPEN
                assert encode_once(encoder) == SHAPE["tokens"]
                assert encoder.state is EncoderState.OPEN  # never closed under a lease

    def swap_text() -> None:
        start.wait()
        for i in range(rounds):
            with manager.lease("qwen3-0.6b" if i % 2 else "gemma3-1b", timeout=60) as lease:
                assert lease.encoder is None

    def run(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (use_vision, use_vision, swap_text)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    manager.close()
    counters = rknn_sim.counters()
    assert counters["inits"] == counters["destroys"] >= 1 and counters["live_contexts"] == 0
    assert counters["concurrent_run_violations"] == 0 and counters["runs"] == 2 * rounds
    assert sim.counter("live_handles") == 0


def test_the_policy_plans_room_for_the_encoder_too(vl_dir: Path) -> None:
    """Pure state: the line counts the encoder file before the load and the encoder's report after it."""
    from rkllm_core._sync import Waiter
    from rkllm_core.models.line import LinePolicy, Request
    from rkllm_core.params import InitParams

    registry = ModelRegistry([vl_dir], platform=None)
    vl, text = registry.get("qwen3-vl-2b"), registry.get("qwen3-0.6b")
    assert vl.encoder_size == 20 * MiB
    policy = LinePolicy(max_loaded=None, memory_budget_mb=35)
    assert policy.estimate_mb(vl) == pytest.approx(30) and policy.estimate_mb(text) == pytest.approx(10)
    req = Request(vl, InitParams(), Waiter(owner="a"), set())
    policy.arrive(req)
    policy.pump()
    action = policy.take_action(req)
    assert action is not None and action[0] == "load"
    entry = action[1]
    assert (entry.estimated_mb, entry.encoder_mb, entry.memory_mb) == pytest.approx((10, 20, 30))

    class Reported:
        memory_bytes = 24 * MiB

    policy.loaded(req, entry, object(), 0.1, Reported())  # type: ignore[arg-type]
    assert entry.memory_mb == pytest.approx(34) and policy.estimate_mb(vl) == pytest.approx(34)


def test_a_handle_closed_by_its_user_takes_the_encoder_with_it(
    manager_factory: Factory, rknn_sim: RKNNSimulatorControl
) -> None:
    manager = manager_factory()
    with manager.lease("qwen3-vl-2b") as lease:
        first = lease.encoder
        assert first is not None
        closed = threading.Event()
        original = first.close

        def close(**kwargs: float) -> None:
            original(**kwargs)
            closed.set()

        first.close = close  # type: ignore[method-assign]  # observe the close, which still runs
        lease.runtime.close()
    with manager.lease("qwen3-vl-2b") as again:  # reloaded, with a fresh encoder
        assert again.encoder is not None and again.encoder is not first
        assert closed.wait(30) and first.state is EncoderState.CLOSED
        assert rknn_sim.counter("live_contexts") == 1


async def test_an_async_lease_gives_the_encoder(manager_factory: Factory) -> None:
    manager = manager_factory()
    async with manager.alease("qwen3-vl-2b") as lease:
        assert lease.encoder is not None and encode_once(lease.encoder) == SHAPE["tokens"]
