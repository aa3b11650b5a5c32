"""The librknnrt simulator keeps the runtime's contract strictly: every misuse is an error and is counted."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_core.errors import HandleClosedError
from rkllm_core.native import rknn
from rkllm_core.native.rknn import RKNNFunctions, RKNNLibrary
from rkllm_core.sim import RKNNSimulatorControl, make_encoder
from tests import rknn_fixtures

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim
Q = rknn.RKNNQueryCmd
T = rknn.RKNNTensorType
F = rknn.RKNNTensorFormat


@pytest.fixture
def fns(rknn_lib: RKNNLibrary) -> RKNNFunctions:
    return rknn_lib.functions


@pytest.fixture
def ctx(fns: RKNNFunctions, rknn_sim: RKNNSimulatorControl, tmp_path: Path) -> Iterator[int]:
    path = make_encoder(tmp_path, "enc.rknn", height=8, width=8, tokens=4, embed=3, outputs=2)
    handle = rknn.rknn_context(0)
    assert fns.rknn_init(ctypes.byref(handle), ctypes.c_char_p(bytes(path)), 0, 0, None) == 0
    yield int(handle.value)
    fns.rknn_destroy(handle.value)


def _input(data: ctypes.Array[ctypes.c_char], **changes: int) -> rknn.rknn_input:
    fields = dict(index=0, size=len(data), pass_through=0, type=int(T.RKNN_TENSOR_UINT8), fmt=int(F.RKNN_TENSOR_NHWC))
    fields.update(changes)
    return rknn.rknn_input(buf=ctypes.addressof(data), **fields)


def _outputs(n: int, **changes: int) -> ctypes.Array[rknn.rknn_output]:
    outs = (rknn.rknn_output * n)()
    for i in range(n):
        outs[i].index, outs[i].want_float, outs[i].is_prealloc = i, 1, 0
        for key, value in changes.items():
            setattr(outs[i], key, value)
    return outs


def _run(fns: RKNNFunctions, ctx: int) -> None:
    pixels = ctypes.create_string_buffer(8 * 8 * 3)
    assert fns.rknn_inputs_set(ctx, 1, ctypes.byref(_input(pixels))) == 0
    assert fns.rknn_run(ctx, None) == 0


def test_queries_answer_the_model_header(fns: RKNNFunctions, ctx: int) -> None:
    io = rknn.rknn_input_output_num()
    assert fns.rknn_query(ctx, Q.RKNN_QUERY_IN_OUT_NUM, ctypes.byref(io), ctypes.sizeof(io)) == 0
    assert (io.n_input, io.n_output) == (1, 2)
    attr = rknn.rknn_tensor_attr(index=1)
    assert fns.rknn_query(ctx, Q.RKNN_QUERY_OUTPUT_ATTR, ctypes.byref(attr), ctypes.sizeof(attr)) == 0
    assert list(attr.dims[: attr.n_dims]) == [1, 4, 3] and attr.index == 1
    attr = rknn.rknn_tensor_attr(index=2)  # there is no third output
    assert fns.rknn_query(ctx, Q.RKNN_QUERY_OUTPUT_ATTR, ctypes.byref(attr), ctypes.sizeof(attr)) == -5


@pytest.mark.parametrize("delta", [-4, 4])
def test_a_query_with_the_wrong_struct_size_is_a_counted_violation(
    fns: RKNNFunctions,
    ctx: int,
    rknn_sim: RKNNSimulatorControl,
    delta: int,
) -> None:
    attr = (ctypes.c_char * (ctypes.sizeof(rknn.rknn_tensor_attr) + 8))()
    code = fns.rknn_query(ctx, Q.RKNN_QUERY_INPUT_ATTR, attr, ctypes.sizeof(rknn.rknn_tensor_attr) + delta)
    assert code == -5 and rknn_sim.counter("struct_size_violations") == 1
    rknn_sim.reset()


@pytest.mark.parametrize(
    "change",
    [
        {"type": int(T.RKNN_TENSOR_FLOAT16)},
        {"type": int(T.RKNN_TENSOR_FLOAT32)},
        {"fmt": int(F.RKNN_TENSOR_NCHW)},
        {"size": 8 * 8 * 3 - 1},
        {"pass_through": 1},
        {"index": 1},
    ],
    ids=["fp16", "fp32-for-uint8-model", "nchw-for-nhwc-model", "short", "pass-through", "index"],
)
def test_a_wrong_input_is_a_counted_violation(
    fns: RKNNFunctions,
    ctx: int,
    rknn_sim: RKNNSimulatorControl,
    change: dict[str, int],
) -> None:
    pixels = ctypes.create_string_buffer(8 * 8 * 3 * 4)
    inp = _input(pixels, size=8 * 8 * 3, **change) if "size" not in change else _input(pixels, **change)
    assert fns.rknn_inputs_set(ctx, 1, ctypes.byref(inp)) == -8
    assert rknn_sim.counter("input_violations") == 1
    assert fns.rknn_run(ctx, None) == -1  # no input was set
    rknn_sim.reset()


def test_outputs_must_be_asked_as_float_and_all_released(
    fns: RKNNFunctions,
    ctx: int,
    rknn_sim: RKNNSimulatorControl,
) -> None:
    _run(fns, ctx)
    assert fns.rknn_outputs_get(ctx, 2, _outputs(2, want_float=0), None) == -9
    assert fns.rknn_outputs_get(ctx, 1, _outputs(1), None) == -9  # not every output
    assert rknn_sim.counter("output_violations") == 2
    outs = _outputs(2)
    assert fns.rknn_outputs_get(ctx, 2, outs, None) == 0
    assert rknn_sim.counter("outputs_outstanding") == 2 and outs[0].size == 4 * 3 * 4
    assert fns.rknn_outputs_get(ctx, 2, _outputs(2), None) == -9  # the previous ones are still held
    assert fns.rknn_outputs_release(ctx, 2, outs) == 0
    assert rknn_sim.counter("outputs_outstanding") == 0 and rknn_sim.counter("outputs_released") == 2
    assert fns.rknn_outputs_release(ctx, 2, outs) == -9  # twice
    assert rknn_sim.counter("output_violations") == 5  # one per output
    rknn_sim.reset()


def test_destroying_with_outputs_held_is_a_counted_leak(
    fns: RKNNFunctions,
    rknn_sim: RKNNSimulatorControl,
    tmp_path: Path,
) -> None:
    path = make_encoder(tmp_path, "enc.rknn", height=8, width=8, tokens=4, embed=3)
    data = path.read_bytes()
    handle = rknn.rknn_context(0)
    assert fns.rknn_init(ctypes.byref(handle), data, len(data), 0, None) == 0  # from a buffer
    _run(fns, int(handle.value))
    assert fns.rknn_outputs_get(handle.value, 1, _outputs(1), None) == 0
    assert fns.rknn_destroy(handle.value) == 0
    assert rknn_sim.counter("outputs_leaked_at_destroy") == 1 and rknn_sim.counter("outputs_outstanding") == 0
    rknn_sim.reset()


def test_a_dead_context_is_refused_and_counted(fns: RKNNFunctions, ctx: int, rknn_sim: RKNNSimulatorControl) -> None:
    assert fns.rknn_run(ctx + (1 << 8), None) == -7  # same slot, another generation
    assert fns.rknn_destroy(12345) == -7
    assert rknn_sim.counter("invalid_context_calls") == 2
    rknn_sim.reset()


def test_a_file_that_is_not_an_encoder_fails_init(
    fns: RKNNFunctions,
    rknn_sim: RKNNSimulatorControl,
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.rknn"
    bad.write_bytes(b"RKNN\0\0garbage")
    handle = rknn.rknn_context(0)
    assert fns.rknn_init(ctypes.byref(handle), ctypes.c_char_p(bytes(bad)), 0, 0, None) == -6
    assert rknn_sim.counter("init_failures") == 1 and rknn_sim.counter("live_contexts") == 0


@pytest.mark.parametrize(("platform", "mask", "code"), [("rk3588", 7, 0), ("rk3576", 3, 0), ("rk3576", 7, -5)])
def test_core_masks_follow_the_platform(
    fns: RKNNFunctions,
    rknn_sim: RKNNSimulatorControl,
    tmp_path: Path,
    platform: str,
    mask: int,
    code: int,
) -> None:
    path = make_encoder(tmp_path, "enc.rknn", height=8, width=8, tokens=4, embed=3, platform=platform)
    handle = rknn.rknn_context(0)
    assert fns.rknn_init(ctypes.byref(handle), ctypes.c_char_p(bytes(path)), 0, 0, None) == 0
    try:
        assert fns.rknn_set_core_mask(handle.value, mask) == code
    finally:
        fns.rknn_destroy(handle.value)


def test_a_destroyed_context_wrapper_refuses_use_and_destroys_once(
    rknn_lib: RKNNLibrary, rknn_sim: RKNNSimulatorControl, tmp_path: Path
) -> None:
    context = rknn.RKNNContext(rknn_lib, make_encoder(tmp_path, "enc.rknn", height=8, width=8, tokens=4, embed=3))
    assert context.in_out_num() == (1, 1) and not context.closed
    context.destroy()
    context.destroy()
    assert context.closed and rknn_sim.counter("destroys") == 1
    with pytest.raises(HandleClosedError):
        context.sdk_version()
