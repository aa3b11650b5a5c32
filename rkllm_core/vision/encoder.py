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

_F32: Final = 4  # bytes per float32 value


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


def _input_geometry(attr: rknn.TensorAttr, path: Path) -> tuple[int, int, str]:
    dims = attr.dims
    if attr.fmt == rknn.RKNNTensorFormat.RKNN_TENSOR_NHWC and len(dims) == 4 and dims[3] == 3:
        return dims[1], dims[2], "nhwc"
    if attr.fmt == rknn.RKNNTensorFormat.RKNN_TENSOR_NCHW and len(dims) == 4 and dims[1] == 3:
        return dims[2], dims[3], "nchw"
    raise ModelFileError(f"{path}: input 0 is not an RGB image tensor (dims {list(dims)}, format {attr.fmt})")


def _output_geometry(attr: rknn.TensorAttr, path: Path) -> tuple[int, int]:
    for i, d in enumerate(attr.dims[:-1]):
        if d > 1:
            return d, attr.dims[i + 1]
    raise ModelFileError(f"{path}: output {attr.index} has no token dimension (dims {list(attr.dims)})")


def read_geometry(context: rknn.RKNNContext, path: Path) -> EncoderGeometry:
    """Query a context's inputs and outputs and derive its :class:`EncoderGeometry`.

    Raises:
        RKNNError: a query failed.
        ModelFileError: the model is not an image encoder (not one RGB input; outputs that disagree).
    """
    n_input, n_output = context.in_out_num()
    if n_input != 1 or n_output < 1:
        raise ModelFileError(f"{path}: an image encoder has 1 input and outputs, this has {n_input}/{n_output}")
    attr = context.tensor_attr(0, output=False)
    height, width, layout = _input_geometry(attr, path)
    shapes = [_output_geometry(context.tensor_attr(i, output=True), path) for i in range(n_output)]
    if len(set(shapes)) != 1:
        raise ModelFileError(f"{path}: the outputs' token shapes differ ({shapes}); cannot interleave them")
    n_tokens, embed_width = shapes[0]
    return EncoderGeometry(height, width, layout, attr.type, n_tokens, embed_width, n_output)


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
        self._lock = threading.Lock()
        self.core_mask = core_mask if core_mask is not None else core_mask_for(soc or detect_board_platform())
        self._context = rknn.RKNNContext(self.library, self.path)
        self.state = EncoderState.OPEN
        try:
            self._context.set_core_mask(self.core_mask)
            self.geometry = read_geometry(self._context, self.path)
            api, driver = self._context.sdk_version()
            self.sdk_version = SDKVersion(api, driver)
            self.memory_bytes = self._read_memory()
        except BaseException:
            self._destroy()
            raise
        self.family = family
        self.pixel_spec = self._pixel_spec(family)

    def _read_memory(self) -> int:
        """Weights plus working memory as the runtime reports them; at least the file's size."""
        try:
            weights, internal = self._context.mem_size()
        except RKNNError:
            return self.path.stat().st_size
        return max(weights + internal, self.path.stat().st_size)

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
        g = self.geometry
        f32 = self.pixel_spec.dtype == "float32"
        tensor_type = rknn.RKNNTensorType.RKNN_TENSOR_FLOAT32 if f32 else rknn.RKNNTensorType.RKNN_TENSOR_UINT8
        fmt = rknn.RKNNTensorFormat.RKNN_TENSOR_NHWC if g.layout == "nhwc" else rknn.RKNNTensorFormat.RKNN_TENSOR_NCHW
        data = self._context.run_interleaved(
            pixels,
            tensor_type=int(tensor_type),
            fmt=int(fmt),
            n_outputs=g.n_outputs,
            n_tokens=g.n_tokens,
            embed_width=g.embed_width,
        )
        return ImageEmbedding(data, g.n_tokens, g.row_width)

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
        self._context.destroy()
