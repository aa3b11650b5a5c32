"""The vision encoder resource: one ``.rknn`` model loaded in ``librknnrt``, run once per image.

One wrapper per native object: :class:`ImageEncoder` owns one ``rknn_context`` from
``rknn_init`` to ``rknn_destroy`` (its :meth:`~ImageEncoder.close`). Every run releases every output
it got, even when copying them fails. All geometry (input H×W and layout, image tokens, embedding
width, number of outputs) is read from the encoder's own attributes when it loads, never assumed;
several outputs ("deepstack" encoders such as Qwen3-VL's) are interleaved per token as Rockchip's
demo does, so the embedding holds ``n_tokens`` rows of ``embed_width × n_outputs`` floats.

One run at a time per context: :meth:`~ImageEncoder.encode` takes the encoder's lock, waiting at
most ``timeout`` seconds (:class:`~rkllm_core.errors.BusyError` after that).
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..board import detect_board_platform, soc_series
from ..errors import BusyError, HandleClosedError, InvalidParameterError, ModelFileError, RKNNError
from ..native import rknn
from .families import VisionFamily
from .preprocess import DEFAULT_MAX_PIXELS, ImageSource, PixelSpec, preprocess

__all__ = [
    "CORE_MASKS",
    "EncoderGeometry",
    "EncoderState",
    "ImageEmbedding",
    "ImageEncoder",
    "SDKVersion",
    "core_mask_for",
]

#: The NPU core mask an encoder runs with, per SoC series (all cores); other SoCs use AUTO.
CORE_MASKS: Final = {
    "rk3588": rknn.RKNNCoreMask.RKNN_NPU_CORE_0_1_2,
    "rk3576": rknn.RKNNCoreMask.RKNN_NPU_CORE_0_1,
}
DEFAULT_TIMEOUT: Final = 60.0
"""Seconds :meth:`ImageEncoder.encode` and :meth:`ImageEncoder.close` wait for a run in progress."""

_F32: Final = ctypes.sizeof(ctypes.c_float)


def core_mask_for(soc: str | None) -> int:
    """The core mask for a SoC: 3 cores on RK3588 (``7``), 2 on RK3576 (``3``), else AUTO (``0``)."""
    return int(CORE_MASKS.get(soc_series(soc), rknn.RKNNCoreMask.RKNN_NPU_CORE_AUTO)) if soc else 0


class EncoderState(enum.Enum):
    """The life cycle of an :class:`ImageEncoder`: open from construction until :meth:`~ImageEncoder.close`."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class SDKVersion:
    """The versions ``RKNN_QUERY_SDK_VERSION`` reports: the runtime API and the NPU driver."""

    api: str
    driver: str


@dataclass(frozen=True)
class EncoderGeometry:
    """An encoder's shapes, as its attributes report them.

    Attributes:
        height: input height in pixels.
        width: input width in pixels.
        layout: input layout, ``"nhwc"`` or ``"nchw"``.
        input_type: the input attribute's ``rknn_tensor_type`` (FP16 for the official encoders).
        n_tokens: image tokens per image (the first dimension > 1 of output 0).
        embed_width: floats per token in one output (the dimension after it).
        n_outputs: how many outputs the encoder has.
    """

    height: int
    width: int
    layout: str
    input_type: int
    n_tokens: int
    embed_width: int
    n_outputs: int

    @property
    def row_width(self) -> int:
        """Floats per token in the interleaved embedding: ``embed_width × n_outputs``."""
        return self.embed_width * self.n_outputs


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's embedding: ``n_tokens`` rows of ``width`` float32 values, row-major, native byte order."""

    data: bytes
    n_tokens: int
    width: int

    def __post_init__(self) -> None:
        if len(self.data) != self.n_tokens * self.width * _F32:
            raise ValueError(f"{len(self.data)} bytes is not {self.n_tokens}x{self.width} float32 values")

    @property
    def nbytes(self) -> int:
        """The size of the embedding in bytes."""
        return len(self.data)

    def floats(self) -> memoryview[float]:
        """The values as a flat float32 memoryview (no copy)."""
        return memoryview(self.data).cast("f")


def _query(fns: rknn.RKNNFunctions, ctx: int, cmd: rknn.RKNNQueryCmd, info: ctypes.Structure) -> None:
    code = fns.rknn_query(ctx, int(cmd), ctypes.byref(info), ctypes.sizeof(info))
    rknn.check(code, "rknn_query", cmd.name)


def _input_geometry(attr: rknn.rknn_tensor_attr, path: Path) -> tuple[int, int, str]:
    dims = list(attr.dims[: attr.n_dims])
    if attr.fmt == rknn.RKNNTensorFormat.RKNN_TENSOR_NHWC and len(dims) == 4 and dims[3] == 3:
        return dims[1], dims[2], "nhwc"
    if attr.fmt == rknn.RKNNTensorFormat.RKNN_TENSOR_NCHW and len(dims) == 4 and dims[1] == 3:
        return dims[2], dims[3], "nchw"
    raise ModelFileError(f"{path}: input 0 is not an RGB image tensor (dims {dims}, format {attr.fmt})")


def _output_geometry(attr: rknn.rknn_tensor_attr, path: Path) -> tuple[int, int]:
    dims = list(attr.dims[: attr.n_dims])
    for i, d in enumerate(dims[:-1]):
        if d > 1:
            return d, dims[i + 1]
    raise ModelFileError(f"{path}: output {attr.index} has no token dimension (dims {dims})")


def read_geometry(fns: rknn.RKNNFunctions, ctx: int, path: Path) -> EncoderGeometry:
    """Query an initialised context's inputs and outputs and derive its :class:`EncoderGeometry`.

    Raises:
        RKNNError: a query failed.
        ModelFileError: the model is not an image encoder (not one RGB input; outputs that disagree).
    """
    io = rknn.rknn_input_output_num()
    _query(fns, ctx, rknn.RKNNQueryCmd.RKNN_QUERY_IN_OUT_NUM, io)
    if io.n_input != 1 or io.n_output < 1:
        raise ModelFileError(f"{path}: an image encoder has 1 input and outputs, this has {io.n_input}/{io.n_output}")
    attr = rknn.rknn_tensor_attr(index=0)
    _query(fns, ctx, rknn.RKNNQueryCmd.RKNN_QUERY_INPUT_ATTR, attr)
    height, width, layout = _input_geometry(attr, path)
    input_type = int(attr.type)
    shapes = []
    for index in range(io.n_output):
        out = rknn.rknn_tensor_attr(index=index)
        _query(fns, ctx, rknn.RKNNQueryCmd.RKNN_QUERY_OUTPUT_ATTR, out)
        shapes.append(_output_geometry(out, path))
    if len(set(shapes)) != 1:
        raise ModelFileError(f"{path}: the outputs' token shapes differ ({shapes}); cannot interleave them")
    n_tokens, embed_width = shapes[0]
    return EncoderGeometry(height, width, layout, input_type, n_tokens, embed_width, io.n_output)


class ImageEncoder:
    """A loaded vision encoder (one ``rknn_context``), kept until :meth:`close`.

    Args:
        path: the ``.rknn`` file.
        family: the model's vision facts (pad colour, host-side mean/std); None: fill 128, no normalisation.
        library: a loaded :class:`~rkllm_core.native.rknn.RKNNLibrary` or its path (default: ``RKNN_LIB_PATH``,
            then the usual places).
        soc: the SoC (``rk3588``) that decides the core mask; default the board's (AUTO when unknown).
        core_mask: an explicit ``rknn_core_mask`` instead.

    Raises:
        ModelFileError: the file is missing, or is not an image encoder.
        RKNNError: ``rknn_init``, ``rknn_set_core_mask`` or a query failed (nothing stays loaded).
        LibraryNotFoundError: no ``librknnrt.so``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        family: VisionFamily | None = None,
        library: rknn.RKNNLibrary | str | os.PathLike[str] | None = None,
        soc: str | None = None,
        core_mask: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"vision encoder file {self.path} does not exist")
        self.library = library if isinstance(library, rknn.RKNNLibrary) else rknn.load_rknn_library(library)
        self._fns = self.library.functions
        self._lock = threading.Lock()
        self.core_mask = core_mask if core_mask is not None else core_mask_for(soc or detect_board_platform())
        self._ctx = self._init_context()
        self.state = EncoderState.OPEN
        try:
            self.geometry = read_geometry(self._fns, self._ctx, self.path)
            self.sdk_version = self._read_sdk_version()
            self.memory_bytes = self._read_memory()
        except BaseException:
            self._destroy()
            raise
        self.family = family
        self.pixel_spec = self._pixel_spec(family)

    def _init_context(self) -> int:
        ctx = rknn.rknn_context(0)
        model = ctypes.c_char_p(os.fsencode(self.path))
        rknn.check(self._fns.rknn_init(ctypes.byref(ctx), model, 0, 0, None), "rknn_init", str(self.path))
        try:
            code = self._fns.rknn_set_core_mask(ctx.value, self.core_mask)
            rknn.check(code, "rknn_set_core_mask", f"core mask {self.core_mask}")
        except BaseException:
            self._fns.rknn_destroy(ctx.value)
            raise
        return int(ctx.value)

    def _read_sdk_version(self) -> SDKVersion:
        version = rknn.rknn_sdk_version()
        _query(self._fns, self._ctx, rknn.RKNNQueryCmd.RKNN_QUERY_SDK_VERSION, version)
        return SDKVersion(version.api_version.decode(errors="replace"), version.drv_version.decode(errors="replace"))

    def _read_memory(self) -> int:
        """Weights plus working memory as the runtime reports them; the file size if it cannot say."""
        mem = rknn.rknn_mem_size()
        try:
            _query(self._fns, self._ctx, rknn.RKNNQueryCmd.RKNN_QUERY_MEM_SIZE, mem)
        except RKNNError:
            return self.path.stat().st_size
        return max(mem.total_weight_size + mem.total_internal_size, self.path.stat().st_size)

    def _pixel_spec(self, family: VisionFamily | None) -> PixelSpec:
        g = self.geometry
        normalise = family is not None and family.mean is not None
        fill = family.fill if family is not None else (128, 128, 128)
        mean, std = (family.mean, family.std) if family is not None and normalise else (None, None)
        return PixelSpec(g.height, g.width, g.layout, "float32" if normalise else "uint8", fill, mean, std)

    def __repr__(self) -> str:
        return f"ImageEncoder({str(self.path)!r}, {self.geometry}, {self.state.value})"

    def __enter__(self) -> ImageEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire(self, timeout: float) -> None:
        if not self._lock.acquire(timeout=timeout):
            raise BusyError(f"vision encoder {self.path.name} is busy (waited {timeout:g} s)", waited=timeout)
        if self.state is EncoderState.CLOSED:
            self._lock.release()
            raise HandleClosedError(f"vision encoder {self.path.name} is closed")

    def encode(self, pixels: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> ImageEmbedding:
        """Run the encoder on one preprocessed image (``pixel_spec.nbytes`` bytes, laid out as ``pixel_spec``).

        Args:
            pixels: the input tensor, as :func:`~rkllm_core.vision.preprocess.to_tensor` makes it.
            timeout: seconds to wait for another run on this encoder to finish.

        Raises:
            InvalidParameterError: ``pixels`` has the wrong size.
            BusyError: another run held the encoder past ``timeout``.
            HandleClosedError: the encoder is closed.
            RKNNError: a native call failed (its outputs are released all the same).
        """
        if len(pixels) != self.pixel_spec.nbytes:
            raise InvalidParameterError(
                f"the encoder takes {self.pixel_spec.nbytes} bytes ({self.pixel_spec}), got {len(pixels)}"
            )
        self._acquire(timeout)
        try:
            return self._run(pixels)
        finally:
            self._lock.release()

    def encode_image(
        self,
        source: ImageSource,
        *,
        allow_remote: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> ImageEmbedding:
        """Read, preprocess (:func:`~rkllm_core.vision.preprocess.preprocess`) and encode one image.

        Raises:
            ImageError: the image cannot be used (nothing ran).
            BusyError, HandleClosedError, RKNNError: as :meth:`encode`.
        """
        pixels = preprocess(source, self.pixel_spec, allow_remote=allow_remote, max_pixels=max_pixels)
        return self.encode(pixels, timeout=timeout)

    def _run(self, pixels: bytes) -> ImageEmbedding:
        g, fns, ctx = self.geometry, self._fns, self._ctx
        buffer = ctypes.create_string_buffer(pixels, len(pixels))
        f32 = self.pixel_spec.dtype == "float32"
        tensor_type = rknn.RKNNTensorType.RKNN_TENSOR_FLOAT32 if f32 else rknn.RKNNTensorType.RKNN_TENSOR_UINT8
        fmt = rknn.RKNNTensorFormat.RKNN_TENSOR_NHWC if g.layout == "nhwc" else rknn.RKNNTensorFormat.RKNN_TENSOR_NCHW
        inp = rknn.rknn_input(
            index=0, buf=ctypes.addressof(buffer), size=len(pixels), pass_through=0, type=int(tensor_type), fmt=int(fmt)
        )
        rknn.check(fns.rknn_inputs_set(ctx, 1, ctypes.byref(inp)), "rknn_inputs_set")
        rknn.check(fns.rknn_run(ctx, None), "rknn_run")
        outputs = (rknn.rknn_output * g.n_outputs)()
        for j in range(g.n_outputs):
            outputs[j].index, outputs[j].want_float, outputs[j].is_prealloc = j, 1, 0
        rknn.check(fns.rknn_outputs_get(ctx, g.n_outputs, outputs, None), "rknn_outputs_get")
        try:
            data = self._interleave(outputs)
        finally:
            released = fns.rknn_outputs_release(ctx, g.n_outputs, outputs)
        rknn.check(released, "rknn_outputs_release")
        return ImageEmbedding(data, g.n_tokens, g.row_width)

    def _interleave(self, outputs: ctypes.Array[rknn.rknn_output]) -> bytes:
        """``out[i*(n*E) + j*E + k] = output_j[i*E + k]``: each token's outputs side by side."""
        g = self.geometry
        chunk = g.embed_width * _F32
        for j, out in enumerate(outputs):
            if not out.buf or out.size < g.n_tokens * chunk:
                raise RKNNError(
                    f"rknn_outputs_get gave output {j} of {out.size} bytes, expected {g.n_tokens * chunk}",
                    code=None,
                    function="rknn_outputs_get",
                )
        sources = [int(out.buf or 0) for out in outputs]
        if g.n_outputs == 1:
            return ctypes.string_at(sources[0], g.n_tokens * chunk)
        result = ctypes.create_string_buffer(g.n_tokens * chunk * g.n_outputs)
        base = ctypes.addressof(result)
        for i in range(g.n_tokens):
            for j, source in enumerate(sources):
                ctypes.memmove(base + (i * g.n_outputs + j) * chunk, source + i * chunk, chunk)
        return result.raw

    def close(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Destroy the context (after a run in progress ends); idempotent.

        Raises:
            BusyError: a run held the encoder past ``timeout`` (the encoder stays open).
        """
        if not self._lock.acquire(timeout=timeout):
            raise BusyError(f"vision encoder {self.path.name} is still running (waited {timeout:g} s)", waited=timeout)
        try:
            self._destroy()
        finally:
            self._lock.release()

    def __del__(self) -> None:
        # A safety net only: the owner closes the encoder; an idle one is not leaked if it forgets.
        if getattr(self, "state", EncoderState.CLOSED) is EncoderState.OPEN and self._lock.acquire(blocking=False):
            try:
                self._destroy()
            except RKNNError:
                pass
            finally:
                self._lock.release()

    def _destroy(self) -> None:
        if self.state is EncoderState.CLOSED:
            return
        self.state = EncoderState.CLOSED
        rknn.check(self._fns.rknn_destroy(self._ctx), "rknn_destroy", str(self.path))
