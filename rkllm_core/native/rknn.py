"""ctypes mirrors of ``rknn_api.h`` (rknn-toolkit2 2.3.2): the calls an image encoder needs.

``librknnrt.so`` is a second native library, separate from ``librkllmrt.so``:
it runs the ``.rknn`` vision encoder of a vision-language model. Names follow
the header exactly, so it can be read side by side with this file; each
function's C prototype is in the comment above its binding. The struct layouts
have been byte-identical since toolkit 1.6.0 and are asserted against the
measured layout in the tests.

Lookup order for the library: the explicit ``path`` argument, then the
``RKNN_LIB_PATH`` environment variable (a file, or a directory holding
``librknnrt.so``), then the usual places (``ctypes.util.find_library``,
``/usr/lib``, ``/usr/local/lib``, the multiarch directories). It is loaded on
first use, never at import. Only ctypes lives here: :mod:`rkllm_core.vision`
wraps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from ctypes import POINTER, Structure, c_char, c_float, c_int, c_int8, c_int32, c_uint8, c_uint32, c_void_p
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

from ..errors import HandleClosedError, LibraryNotFoundError, RKNNError
from .library import locate_library

__all__ = [
    "LIBRARY_NAME",
    "RKNNContext",
    "RKNNFunctions",
    "RKNNLibrary",
    "TensorAttr",
    "check",
    "error_name",
    "find_rknn_library",
    "load_rknn_library",
]

LIBRARY_NAME: Final = "librknnrt.so"
RKNN_MAX_DIMS: Final = 16
RKNN_MAX_NAME_LEN: Final = 256

# typedef uint64_t rknn_context; (uint32_t on 32-bit ARM)
rknn_context = ctypes.c_uint64 if ctypes.sizeof(c_void_p) == 8 else ctypes.c_uint32
c_enum = c_int


class RKNNQueryCmd(IntEnum):
    """``rknn_query_cmd``: the queries an encoder uses."""

    RKNN_QUERY_IN_OUT_NUM = 0
    RKNN_QUERY_INPUT_ATTR = 1
    RKNN_QUERY_OUTPUT_ATTR = 2
    RKNN_QUERY_PERF_DETAIL = 3
    RKNN_QUERY_PERF_RUN = 4
    RKNN_QUERY_SDK_VERSION = 5
    RKNN_QUERY_MEM_SIZE = 6
    RKNN_QUERY_CUSTOM_STRING = 7


class RKNNTensorType(IntEnum):
    """``rknn_tensor_type``."""

    RKNN_TENSOR_FLOAT32 = 0
    RKNN_TENSOR_FLOAT16 = 1
    RKNN_TENSOR_INT8 = 2
    RKNN_TENSOR_UINT8 = 3
    RKNN_TENSOR_INT16 = 4
    RKNN_TENSOR_UINT16 = 5
    RKNN_TENSOR_INT32 = 6
    RKNN_TENSOR_UINT32 = 7
    RKNN_TENSOR_INT64 = 8
    RKNN_TENSOR_BOOL = 9
    RKNN_TENSOR_INT4 = 10
    RKNN_TENSOR_BFLOAT16 = 11


class RKNNTensorFormat(IntEnum):
    """``rknn_tensor_format``."""

    RKNN_TENSOR_NCHW = 0
    RKNN_TENSOR_NHWC = 1
    RKNN_TENSOR_NC1HWC2 = 2
    RKNN_TENSOR_UNDEFINED = 3


class RKNNQuantType(IntEnum):
    """``rknn_tensor_qnt_type``."""

    RKNN_TENSOR_QNT_NONE = 0
    RKNN_TENSOR_QNT_DFP = 1
    RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC = 2


class RKNNCoreMask(IntEnum):
    """``rknn_core_mask``: which NPU cores a context runs on."""

    RKNN_NPU_CORE_AUTO = 0
    RKNN_NPU_CORE_0 = 1
    RKNN_NPU_CORE_1 = 2
    RKNN_NPU_CORE_2 = 4
    RKNN_NPU_CORE_0_1 = 3
    RKNN_NPU_CORE_0_1_2 = 7
    RKNN_NPU_CORE_ALL = 0xFFFF


#: ``RKNN_SUCC`` and the ``RKNN_ERR_*`` codes (the header spells two of them ``INCOMPATILE``).
ERROR_NAMES: Final = {
    0: "RKNN_SUCC",
    -1: "RKNN_ERR_FAIL",
    -2: "RKNN_ERR_TIMEOUT",
    -3: "RKNN_ERR_DEVICE_UNAVAILABLE",
    -4: "RKNN_ERR_MALLOC_FAIL",
    -5: "RKNN_ERR_PARAM_INVALID",
    -6: "RKNN_ERR_MODEL_INVALID",
    -7: "RKNN_ERR_CTX_INVALID",
    -8: "RKNN_ERR_INPUT_INVALID",
    -9: "RKNN_ERR_OUTPUT_INVALID",
    -10: "RKNN_ERR_DEVICE_UNMATCH",
    -11: "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL",
    -12: "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION",
    -13: "RKNN_ERR_TARGET_PLATFORM_UNMATCH",
}


class rknn_input_output_num(Structure):
    """``rknn_input_output_num``: how many inputs and outputs a model has."""

    n_input: int
    n_output: int
    _fields_ = [("n_input", c_uint32), ("n_output", c_uint32)]


class rknn_tensor_attr(Structure):
    """``rknn_tensor_attr``: one input's or output's shape, format and type (set ``index`` before querying)."""

    index: int
    n_dims: int
    dims: Any
    name: bytes
    n_elems: int
    size: int
    fmt: int
    type: int
    qnt_type: int
    fl: int
    zp: int
    scale: float
    w_stride: int
    size_with_stride: int
    pass_through: int
    h_stride: int
    _fields_ = [
        ("index", c_uint32),
        ("n_dims", c_uint32),
        ("dims", c_uint32 * RKNN_MAX_DIMS),
        ("name", c_char * RKNN_MAX_NAME_LEN),
        ("n_elems", c_uint32),
        ("size", c_uint32),
        ("fmt", c_enum),
        ("type", c_enum),
        ("qnt_type", c_enum),
        ("fl", c_int8),
        ("zp", c_int32),
        ("scale", c_float),
        ("w_stride", c_uint32),
        ("size_with_stride", c_uint32),
        ("pass_through", c_uint8),
        ("h_stride", c_uint32),
    ]


class rknn_sdk_version(Structure):
    """``rknn_sdk_version``: the runtime API and NPU driver versions."""

    api_version: bytes
    drv_version: bytes
    _fields_ = [("api_version", c_char * 256), ("drv_version", c_char * 256)]


class rknn_mem_size(Structure):
    """``rknn_mem_size``: what a context holds in memory."""

    total_weight_size: int
    total_internal_size: int
    total_dma_allocated_size: int
    total_sram_size: int
    free_sram_size: int
    _fields_ = [
        ("total_weight_size", c_uint32),
        ("total_internal_size", c_uint32),
        ("total_dma_allocated_size", ctypes.c_uint64),
        ("total_sram_size", c_uint32),
        ("free_sram_size", c_uint32),
        ("reserved", c_uint32 * 10),
    ]


class rknn_custom_string(Structure):
    """``rknn_custom_string``: the string a model was converted with."""

    string: bytes
    _fields_ = [("string", c_char * 1024)]


class rknn_init_extend(Structure):
    """``rknn_init_extend`` (the encoder passes NULL; mirrored for the layout)."""

    _fields_ = [
        ("ctx", rknn_context),
        ("real_model_offset", c_int32),
        ("real_model_size", c_uint32),
        ("model_buffer_fd", c_int32),
        ("model_buffer_flags", c_uint32),
        ("reserved", c_uint8 * 112),
    ]


class rknn_run_extend(Structure):
    """``rknn_run_extend`` (the encoder passes NULL; mirrored for the layout)."""

    _fields_ = [("frame_id", ctypes.c_uint64), ("non_block", c_int32), ("timeout_ms", c_int32), ("fence_fd", c_int32)]


class rknn_output_extend(Structure):
    """``rknn_output_extend`` (the encoder passes NULL; mirrored for the layout)."""

    _fields_ = [("frame_id", ctypes.c_uint64)]


class rknn_input(Structure):
    """``rknn_input``: one input buffer handed to ``rknn_inputs_set``."""

    index: int
    buf: int | None
    size: int
    pass_through: int
    type: int
    fmt: int
    _fields_ = [
        ("index", c_uint32),
        ("buf", c_void_p),
        ("size", c_uint32),
        ("pass_through", c_uint8),
        ("type", c_enum),
        ("fmt", c_enum),
    ]


class rknn_output(Structure):
    """``rknn_output``: one output; with ``is_prealloc = 0`` the runtime owns ``buf`` until release."""

    want_float: int
    is_prealloc: int
    index: int
    buf: int | None
    size: int
    _fields_ = [
        ("want_float", c_uint8),
        ("is_prealloc", c_uint8),
        ("index", c_uint32),
        ("buf", c_void_p),
        ("size", c_uint32),
    ]


#: The queries' result structs, by command (the size passed is always ``sizeof`` of it).
QUERY_STRUCTS: Final[dict[RKNNQueryCmd, type[Structure]]] = {
    RKNNQueryCmd.RKNN_QUERY_IN_OUT_NUM: rknn_input_output_num,
    RKNNQueryCmd.RKNN_QUERY_INPUT_ATTR: rknn_tensor_attr,
    RKNNQueryCmd.RKNN_QUERY_OUTPUT_ATTR: rknn_tensor_attr,
    RKNNQueryCmd.RKNN_QUERY_SDK_VERSION: rknn_sdk_version,
    RKNNQueryCmd.RKNN_QUERY_MEM_SIZE: rknn_mem_size,
    RKNNQueryCmd.RKNN_QUERY_CUSTOM_STRING: rknn_custom_string,
}


def error_name(code: int) -> str:
    """The header's name of a return code (``RKNN_ERR_CTX_INVALID`` for -7), or ``unknown error``."""
    return ERROR_NAMES.get(code, "unknown error")


def check(code: int, function: str, what: str = "") -> None:
    """Raise :class:`~rkllm_core.errors.RKNNError` naming ``function`` and its code unless ``code`` is 0.

    Args:
        code: the value the native function returned.
        function: the native function's name (``rknn_run``).
        what: optional context for the message (the model file).
    """
    if code != 0:
        where = f" ({what})" if what else ""
        raise RKNNError(f"{function} returned {code} ({error_name(code)}){where}", code=code, function=function)


class RKNNFunctions:
    """The bound ``librknnrt`` functions, with their C prototypes."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        ctx_p = POINTER(rknn_context)
        # int rknn_init(rknn_context* context, void* model, uint32_t size, uint32_t flag,
        #               rknn_init_extend* extend);
        self.rknn_init = _bind(cdll, "rknn_init", [ctx_p, c_void_p, c_uint32, c_uint32, POINTER(rknn_init_extend)])
        # int rknn_set_core_mask(rknn_context context, rknn_core_mask core_mask);
        self.rknn_set_core_mask = _bind(cdll, "rknn_set_core_mask", [rknn_context, c_enum])
        # int rknn_query(rknn_context context, rknn_query_cmd cmd, void* info, uint32_t size);
        self.rknn_query = _bind(cdll, "rknn_query", [rknn_context, c_enum, c_void_p, c_uint32])
        # int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]);
        self.rknn_inputs_set = _bind(cdll, "rknn_inputs_set", [rknn_context, c_uint32, POINTER(rknn_input)])
        # int rknn_run(rknn_context context, rknn_run_extend* extend);
        self.rknn_run = _bind(cdll, "rknn_run", [rknn_context, POINTER(rknn_run_extend)])
        # int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[],
        #                      rknn_output_extend* extend);
        self.rknn_outputs_get = _bind(
            cdll, "rknn_outputs_get", [rknn_context, c_uint32, POINTER(rknn_output), POINTER(rknn_output_extend)]
        )
        # int rknn_outputs_release(rknn_context context, uint32_t n_ouputs, rknn_output outputs[]);
        self.rknn_outputs_release = _bind(cdll, "rknn_outputs_release", [rknn_context, c_uint32, POINTER(rknn_output)])
        # int rknn_destroy(rknn_context context);
        self.rknn_destroy = _bind(cdll, "rknn_destroy", [rknn_context])


def _bind(cdll: ctypes.CDLL, name: str, argtypes: list[Any]) -> Any:
    fn = getattr(cdll, name)
    fn.argtypes = argtypes
    fn.restype = c_int
    return fn


REQUIRED_SYMBOLS: Final = (
    "rknn_init",
    "rknn_set_core_mask",
    "rknn_query",
    "rknn_inputs_set",
    "rknn_run",
    "rknn_outputs_get",
    "rknn_outputs_release",
    "rknn_destroy",
)


def candidate_paths() -> list[str]:
    """The default places to look for ``librknnrt.so``, in order (no environment)."""
    found = ctypes.util.find_library("rknnrt")
    dirs = ["/usr/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu", "/usr/lib/arm-linux-gnueabihf", "/usr/lib64"]
    paths = [found] if found else []
    paths += [os.path.join(d, LIBRARY_NAME) for d in dirs]
    return list(dict.fromkeys(paths))


def find_rknn_library(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``librknnrt.so``: ``path``, then ``RKNN_LIB_PATH``, then :func:`candidate_paths`.

    Raises:
        LibraryNotFoundError: nothing was found; the message lists every path tried.
    """
    return locate_library(
        LIBRARY_NAME,
        path,
        "RKNN_LIB_PATH",
        candidate_paths(),
        "It is the RKNN runtime that runs vision encoders: install it from rknn-toolkit2 "
        "(rknpu2/runtime/Linux/librknn_api) or set RKNN_LIB_PATH. Without a board, build the simulator: "
        "rkllm_core.sim.build_rknn_simulator()",
    )


@dataclass(frozen=True)
class RKNNLibrary:
    """A loaded ``librknnrt.so`` with its functions bound."""

    path: Path
    functions: RKNNFunctions = field(repr=False)
    cdll: ctypes.CDLL = field(repr=False)

    @property
    def is_simulator(self) -> bool:
        """True for the bundled simulator."""
        return hasattr(self.cdll, "rknn_sim_counter")


_loaded: dict[str, RKNNLibrary] = {}
_load_lock = threading.Lock()


def load_rknn_library(path: str | os.PathLike[str] | None = None) -> RKNNLibrary:
    """Find, load and bind ``librknnrt.so`` (cached per path, so cheap after the first call).

    Raises:
        LibraryNotFoundError: not found, not loadable, or not the RKNN runtime (missing symbols).
    """
    lib_path = find_rknn_library(path)
    key = str(lib_path.resolve()) if os.sep in str(lib_path) else str(lib_path)
    with _load_lock:
        cached = _loaded.get(key)
        if cached is not None:
            return cached
        try:
            cdll = ctypes.CDLL(str(lib_path), mode=getattr(os, "RTLD_LOCAL", 0))
        except OSError as exc:
            raise LibraryNotFoundError(f"cannot load {lib_path}: {exc}", [str(lib_path)]) from exc
        missing = [s for s in REQUIRED_SYMBOLS if not hasattr(cdll, s)]
        if missing:
            raise LibraryNotFoundError(
                f"{lib_path} does not look like the RKNN runtime: missing {', '.join(missing)}", [str(lib_path)]
            )
        lib = RKNNLibrary(lib_path, RKNNFunctions(cdll), cdll)
        _loaded[key] = lib
        return lib


# ---------------------------------------------------------------------------
# One wrapper per native object
# ---------------------------------------------------------------------------

_F32: Final = ctypes.sizeof(c_float)


@dataclass(frozen=True)
class TensorAttr:
    """What ``rknn_query`` reports about one input or output (a plain copy of ``rknn_tensor_attr``)."""

    index: int
    dims: tuple[int, ...]
    fmt: int
    type: int
    name: str
    n_elems: int
    size: int


class RKNNContext:
    """One ``rknn_context``, from ``rknn_init`` to :meth:`destroy`; not thread-safe (its owner serialises calls).

    Args:
        library: the loaded runtime.
        model: the ``.rknn`` file (passed by path: ``size == 0``).

    Raises:
        RKNNError: ``rknn_init`` failed.
    """

    def __init__(self, library: RKNNLibrary, model: Path) -> None:
        self._fns = library.functions
        self.model = model
        ctx = rknn_context(0)
        path = ctypes.c_char_p(os.fsencode(model))
        check(self._fns.rknn_init(ctypes.byref(ctx), path, 0, 0, None), "rknn_init", str(model))
        self._ctx: int | None = int(ctx.value)

    @property
    def closed(self) -> bool:
        """True after :meth:`destroy`."""
        return self._ctx is None

    def _handle(self) -> int:
        if self._ctx is None:
            raise HandleClosedError(f"the rknn_context of {self.model.name} is destroyed")
        return self._ctx

    def set_core_mask(self, mask: int) -> None:
        """``rknn_set_core_mask``, its return code checked."""
        check(self._fns.rknn_set_core_mask(self._handle(), mask), "rknn_set_core_mask", f"core mask {mask}")

    def query(self, cmd: RKNNQueryCmd, info: ctypes.Structure) -> None:
        """``rknn_query`` into ``info`` (its size passed as ``sizeof``), checked."""
        code = self._fns.rknn_query(self._handle(), int(cmd), ctypes.byref(info), ctypes.sizeof(info))
        check(code, "rknn_query", cmd.name)

    def in_out_num(self) -> tuple[int, int]:
        """The numbers of inputs and outputs."""
        io = rknn_input_output_num()
        self.query(RKNNQueryCmd.RKNN_QUERY_IN_OUT_NUM, io)
        return int(io.n_input), int(io.n_output)

    def tensor_attr(self, index: int, *, output: bool) -> TensorAttr:
        """The attributes of input or output ``index``."""
        attr = rknn_tensor_attr(index=index)
        self.query(RKNNQueryCmd.RKNN_QUERY_OUTPUT_ATTR if output else RKNNQueryCmd.RKNN_QUERY_INPUT_ATTR, attr)
        dims = tuple(int(d) for d in attr.dims[: min(attr.n_dims, RKNN_MAX_DIMS)])
        name = attr.name.decode(errors="replace")
        return TensorAttr(int(attr.index), dims, int(attr.fmt), int(attr.type), name, int(attr.n_elems), int(attr.size))

    def sdk_version(self) -> tuple[str, str]:
        """``RKNN_QUERY_SDK_VERSION``: the runtime API version and the NPU driver version."""
        version = rknn_sdk_version()
        self.query(RKNNQueryCmd.RKNN_QUERY_SDK_VERSION, version)
        return version.api_version.decode(errors="replace"), version.drv_version.decode(errors="replace")

    def mem_size(self) -> tuple[int, int]:
        """``RKNN_QUERY_MEM_SIZE``: the weights' and the working memory's sizes in bytes."""
        mem = rknn_mem_size()
        self.query(RKNNQueryCmd.RKNN_QUERY_MEM_SIZE, mem)
        return int(mem.total_weight_size), int(mem.total_internal_size)

    def run_interleaved(
        self, pixels: bytes, *, tensor_type: int, fmt: int, n_outputs: int, n_tokens: int, embed_width: int
    ) -> bytes:
        """Set the one input, run, and copy every output as float32, interleaved per token; outputs always released.

        The result holds ``n_tokens`` rows of ``embed_width * n_outputs`` floats; row ``i`` is output
        0's row ``i``, then output 1's, and so on (``out[i*(n*E) + j*E + k] = output_j[i*E + k]``, as
        Rockchip's multimodal demo lays out "deepstack" encoders). Every output is released, also
        when copying fails.

        Raises:
            RKNNError: a call failed, or an output is smaller than ``n_tokens × embed_width`` floats.
        """
        ctx = self._handle()
        buffer = ctypes.create_string_buffer(pixels, len(pixels))
        inp = rknn_input(
            index=0, buf=ctypes.addressof(buffer), size=len(pixels), pass_through=0, type=tensor_type, fmt=fmt
        )
        check(self._fns.rknn_inputs_set(ctx, 1, ctypes.byref(inp)), "rknn_inputs_set")
        check(self._fns.rknn_run(ctx, None), "rknn_run")
        outputs = (rknn_output * n_outputs)()
        for j in range(n_outputs):
            outputs[j].index, outputs[j].want_float, outputs[j].is_prealloc = j, 1, 0
        check(self._fns.rknn_outputs_get(ctx, n_outputs, outputs, None), "rknn_outputs_get")
        try:
            data = _interleave(outputs, n_tokens, embed_width * _F32)
        finally:
            released = self._fns.rknn_outputs_release(ctx, n_outputs, outputs)
        check(released, "rknn_outputs_release")
        return data

    def destroy(self) -> None:
        """``rknn_destroy``; idempotent."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            check(self._fns.rknn_destroy(ctx), "rknn_destroy", str(self.model))


def _interleave(outputs: ctypes.Array[rknn_output], n_tokens: int, row: int) -> bytes:
    for j, out in enumerate(outputs):
        if not out.buf or out.size < n_tokens * row:
            raise RKNNError(
                f"rknn_outputs_get gave output {j} of {out.size} bytes, expected {n_tokens * row}",
                code=None,
                function="rknn_outputs_get",
            )
    sources = [int(out.buf or 0) for out in outputs]
    if len(sources) == 1:
        return ctypes.string_at(sources[0], row * n_tokens)
    result = ctypes.create_string_buffer(row * n_tokens * len(sources))
    base = ctypes.addressof(result)
    for i in range(n_tokens):
        for j, source in enumerate(sources):
            ctypes.memmove(base + (i * len(sources) + j) * row, source + i * row, row)
    return result.raw
