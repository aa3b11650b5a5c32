"""The bundled runtime simulator: build it, control it, and make model files for it.

The simulator is a C library with the same ABI as ``librkllmrt.so`` (1.2 or
1.3, chosen at compile time). It lets everything above the ctypes layer run
on a machine without an NPU, through the very code path used on a board.
It is compiled on first use with the system C compiler into a per-user cache
keyed by the hash of its source, so rebuilding is automatic and cheap.

A second simulator, of ``librknnrt.so`` (the runtime of vision encoders), is
built by :func:`build_rknn_simulator`; :func:`make_encoder` writes ``.rknn``
files for it and :class:`RKNNSimulatorControl` reads its counters.

Run ``python -m rkllm_core.sim`` to build both ABIs and print the paths, or
``rkllm demo`` to build one and write the demo models (:data:`DEMO_MODELS`,
made by :func:`make_demo_models`) that the ``rkllm`` commands then find.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import RKLLMError

__all__ = [
    "DEMO_MODELS",
    "DemoModel",
    "RKNNSimulatorControl",
    "SimulatorBuildError",
    "SimulatorControl",
    "build_rknn_simulator",
    "build_simulator",
    "default_cache_dir",
    "default_demo_dir",
    "make_demo_models",
    "make_encoder",
    "make_model",
]

COUNTERS = (
    "live_handles",
    "inits",
    "init_failures",
    "destroys",
    "runs",
    "active_runs",
    "max_active_runs",
    "prefilled_tokens",
    "generated_tokens",
    "callbacks",
    "aborts",
    "pauses",
    "errors",
    "kv_clears",
    "prompt_cache_saves",
    "prompt_cache_loads",
    "prompt_cache_releases",
    "prompt_cache_hit_tokens",
    "lora_loads",
    "template_sets",
    "tools_sets",
    "context_shifts",
    "busy_ns",
    "invalid_handle_calls",
    "concurrent_run_violations",
    "destroy_while_running",
    "resident_handles",
    "max_resident_handles",
    "batched_runs",
    "batch_steps",
    "batch_refusals",
    "multimodal_violations",
)

_CFLAGS = ("-std=c11", "-O2", "-shared", "-fPIC", "-pthread")
_build_lock = threading.Lock()


class SimulatorBuildError(RKLLMError, RuntimeError):
    """The simulator could not be compiled (no C compiler, or a compiler error)."""


def default_cache_dir() -> Path:
    """Return where built simulators are cached (``$XDG_CACHE_HOME/rkllm-core/sim``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rkllm-core" / "sim"


def _source() -> bytes:
    return resources.files("rkllm_core.sim").joinpath("rkllm_sim.c").read_bytes()


def _compiler(cc: str | None) -> str:
    for candidate in (cc, os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise SimulatorBuildError("no C compiler found (tried $CC, cc, gcc, clang); install gcc to build the simulator")


def build_simulator(
    abi: str = "1.3",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cc: str | None = None,
    force: bool = False,
) -> Path:
    """Compile the simulator for ``abi`` (once per source version) and return the library path.

    Args:
        abi: "1.2" or "1.3".
        cache_dir: where to keep built libraries (default :func:`default_cache_dir`).
        cc: the C compiler (default ``$CC``, then ``cc``, ``gcc``, ``clang``).
        force: rebuild even when a cached build exists.

    Raises:
        SimulatorBuildError: no compiler, or compilation failed (with its output).
    """
    if abi not in ("1.2", "1.3"):
        raise ValueError(f"abi must be '1.2' or '1.3', got {abi!r}")
    compiler = _compiler(cc)
    source = _source()
    define = "-DRKLLM_SIM_ABI=" + abi.replace(".", "")
    key = hashlib.sha256(b"\0".join([source, define.encode(), compiler.encode(), " ".join(_CFLAGS).encode()]))
    out_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = out_dir / key.hexdigest()[:16] / f"librkllmrt-sim-{abi}.so"
    with _build_lock:
        if target.is_file() and not force:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "rkllm_sim.c"
            src.write_bytes(source)
            built = Path(tmp) / target.name
            cmd = [compiler, *_CFLAGS, define, str(src), "-o", str(built)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SimulatorBuildError(f"building the simulator failed: {' '.join(cmd)}\n{proc.stderr}")
            os.replace(built, target)  # atomic: concurrent builders never see a partial file
    return target


def make_model(
    directory: str | os.PathLike[str],
    filename: str = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm",
    *,
    size_mb: float = 0.0,
    memory_mb: int | None = None,
    think: bool = True,
    max_context: int | None = None,
    yes_token: int | None = None,
    no_token: int | None = None,
    hidden_size: int | None = None,
) -> Path:
    """Write a model file the simulator accepts.

    The file is sparse when ``size_mb`` is given, so a "1 GB model" costs no
    disk. The context limit comes from ``ctxNNNN`` in the file name, else
    ``max_context``, else 4096 (like real converted models). A file that
    already starts with the same header and has the same size is left as it
    is (not even its modification time changes).

    ``yes_token`` and ``no_token`` (both or neither; distinct ids below
    151936) make the model a reranker: in logits mode the last position's
    logits favour ``yes_token`` the more of the query's words (after the last
    ``<Query>:``) the document (after the last ``<Document>:``) contains.
    In hidden-state mode every model is a bag-of-words embedding model.

    ``hidden_size`` makes it a vision-language model: multimodal runs read
    ``n_image * n_image_tokens * hidden_size`` floats of image embeddings and
    answer with the dominant colour of each image (see ``rkllm_sim.c``).
    """
    if (yes_token is None) != (no_token is None):
        raise ValueError("yes_token and no_token must be given together")
    path = Path(directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["RKLLMSIM 1"]
    if memory_mb is not None:
        lines.append(f"memory_mb={memory_mb}")
    if max_context is not None:
        lines.append(f"max_context={max_context}")
    lines.append(f"think={1 if think else 0}")
    if yes_token is not None and no_token is not None:
        lines.append(f"yes_token={int(yes_token)}")
        lines.append(f"no_token={int(no_token)}")
    if hidden_size is not None:
        lines.append(f"hidden_size={int(hidden_size)}")
    header = ("\n".join(lines) + "\n\n").encode()
    size = max(len(header), int(size_mb * 1024 * 1024)) if size_mb > 0 else len(header)
    if _holds(path, header, size):
        return path
    with open(path, "wb") as f:
        f.write(header)
        if size > len(header):
            f.truncate(size)
    return path


def _holds(path: Path, header: bytes, size: int) -> bool:
    """Whether ``path`` is a file of ``size`` bytes that starts with ``header``."""
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


@dataclass(frozen=True)
class DemoModel:
    """One model of the demo set: a real public file name, so it is named and kinded as on a board.

    Attributes:
        filename: the file name (its friendly name and kind come from it).
        size_mb: the apparent size of the (sparse) file, close to the real model's.
        options: more :func:`make_model` keyword arguments (a reranker's yes/no token ids).
    """

    filename: str
    size_mb: float
    options: dict[str, Any] = field(default_factory=dict)


# Qwen's ids of the tokens "yes" and "no": the simulated reranker answers with them, like the real one.
_YES_NO = {"yes_token": 9693, "no_token": 2152}

#: The models ``rkllm demo`` and the quickstart make: two chat models
#: (``qwen3-0.6b``, ``qwen3-1.7b``), an embedding model (``qwen3-embedding-0.6b``)
#: and a reranker (``qwen3-reranker-0.6b``), under file names published for the RK3588.
DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel("Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", 890),
    DemoModel("Qwen3-1.7B-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm", 2300),
    DemoModel("Qwen3-Embedding-0.6B-rk3588-w8a8_g256-opt-1-hybrid-ratio-0.0.rkllm", 640),
    DemoModel("Qwen3-Reranker-0.6B-rk3588-w8a8_g256-opt-1-hybrid-ratio-0.0.rkllm", 640, dict(_YES_NO)),
)


def default_demo_dir() -> Path:
    """Return where the demo models go by default (``${XDG_CACHE_HOME:-~/.cache}/rkllm/demo/models``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rkllm" / "demo" / "models"


def make_demo_models(
    directory: str | os.PathLike[str] | None = None, models: tuple[DemoModel, ...] = DEMO_MODELS
) -> list[Path]:
    """Write the demo model files (sparse: they cost no disk) and return their paths.

    Idempotent: a file that is already as it should be is not rewritten.

    Args:
        directory: where to write them (default :func:`default_demo_dir`).
        models: which (default :data:`DEMO_MODELS`).
    """
    where = Path(directory) if directory is not None else default_demo_dir()
    return [make_model(where, m.filename, size_mb=m.size_mb, **m.options) for m in models]


class SimulatorControl:
    """Read the simulator's counters and trace, and change its settings.

    Settings (``set``): ``token_delay_ms``, ``prefill_ms_per_token``,
    ``init_delay_ms``, ``destroy_delay_ms``, ``error_after_tokens``,
    ``finish_after_abort``, ``waiting_text``, ``split_utf8_normal``,
    ``trace``, ``banner``, and for handles with ``n_batch > 1``
    ``batch_step_cost`` (a decode step costs ``token_delay_ms * (1 +
    batch_step_cost * (active slots - 1))``, default 0.15) and
    ``batch_finish`` (the shape of the closing callback: 0 an array of
    results, 1 a single result, 2 none; see the C source's top comment).
    """

    def __init__(self, library_path: str | os.PathLike[str]) -> None:
        # The same path loads the same already-mapped library as the runtime binding.
        self._lib = ctypes.CDLL(os.fspath(library_path))
        lib = self._lib
        lib.rkllm_sim_counter.restype, lib.rkllm_sim_counter.argtypes = ctypes.c_longlong, [ctypes.c_char_p]
        lib.rkllm_sim_set.restype = ctypes.c_int
        lib.rkllm_sim_set.argtypes = [ctypes.c_char_p, ctypes.c_double]
        lib.rkllm_sim_reset_counters.restype, lib.rkllm_sim_reset_counters.argtypes = None, []
        lib.rkllm_sim_trace_read.restype = ctypes.c_size_t
        lib.rkllm_sim_trace_read.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.rkllm_sim_trace_clear.restype, lib.rkllm_sim_trace_clear.argtypes = None, []
        lib.rkllm_sim_abi.restype, lib.rkllm_sim_abi.argtypes = ctypes.c_int, []

    @property
    def abi(self) -> str:
        """The ABI the simulator was built for."""
        return {12: "1.2", 13: "1.3"}[self._lib.rkllm_sim_abi()]

    def counter(self, name: str) -> int:
        """Return one counter (see :data:`COUNTERS`)."""
        value = int(self._lib.rkllm_sim_counter(name.encode()))
        if value < 0:
            raise KeyError(name)
        return value

    def counters(self) -> dict[str, int]:
        """Return all counters."""
        return {name: self.counter(name) for name in COUNTERS}

    def reset(self) -> None:
        """Reset the counters (not ``live_handles``/``active_runs``/``resident_handles``; the maxima to the current)."""
        self._lib.rkllm_sim_reset_counters()

    def set(self, key: str, value: float) -> None:
        """Change a global simulator setting."""
        if self._lib.rkllm_sim_set(key.encode(), float(value)) != 0:
            raise KeyError(key)

    def trace(self) -> list[dict[str, Any]]:
        """Return the recorded API calls (enable with ``set("trace", 1)``; with 2, also each run's context)."""
        size = int(self._lib.rkllm_sim_trace_read(None, 0))
        buf = ctypes.create_string_buffer(size + 1)
        self._lib.rkllm_sim_trace_read(buf, size + 1)
        return [json.loads(line) for line in buf.raw[:size].decode("utf-8", "replace").splitlines() if line]

    def clear_trace(self) -> None:
        """Forget the recorded calls."""
        self._lib.rkllm_sim_trace_clear()


def main(argv: list[str] | None = None) -> int:
    """Build the simulator for both ABIs and print the library paths.

    stdout has one ``ABI<TAB>PATH`` line per ABI (for scripts); stderr says
    what the paths are and how to use them.
    """
    del argv
    built: dict[str, Path] = {}
    for abi in ("1.2", "1.3"):
        try:
            built[abi] = build_simulator(abi)
        except SimulatorBuildError as exc:
            sys.stderr.write(f"{exc}\n")
            return 1
        sys.stdout.write(f"{abi}\t{built[abi]}\n")
    sys.stdout.flush()
    sys.stderr.write(
        "These are the runtime SIMULATOR libraries (no NPU) for the RKLLM ABIs 1.2 and 1.3. To use one, "
        f"point RKLLM_LIB_PATH at it, e.g.\n  export RKLLM_LIB_PATH={shlex.quote(str(built['1.3']))}\n"
        "and put .rkllm files in a model directory (RKLLM_MODEL_DIR); or run\n"
        '  eval "$(rkllm demo)"\n'
        "which sets both for this shell, with demo models (add --abi 1.2 for the 1.2 one).\n"
    )
    return 0


# ---------------------------------------------------------------------------
# The librknnrt simulator (vision encoders)
# ---------------------------------------------------------------------------

RKNN_COUNTERS = (
    "live_contexts",
    "inits",
    "init_failures",
    "destroys",
    "runs",
    "core_mask_sets",
    "last_core_mask",
    "outputs_gets",
    "outputs_outstanding",
    "outputs_released",
    "outputs_leaked_at_destroy",
    "struct_size_violations",
    "input_violations",
    "output_violations",
    "invalid_context_calls",
    "concurrent_run_violations",
    "destroy_while_running",
    "active_runs",
    "max_active_runs",
    "errors",
)
"""The counters of the RKNN simulator (see the top comment of ``rknn_sim.c``)."""


def build_rknn_simulator(
    *, cache_dir: str | os.PathLike[str] | None = None, cc: str | None = None, force: bool = False
) -> Path:
    """Compile the ``librknnrt.so`` simulator (once per source version) and return its path.

    Point ``RKNN_LIB_PATH`` at the result to run vision encoders without a board.

    Args:
        cache_dir: where to keep built libraries (default :func:`default_cache_dir`).
        cc: the C compiler (default ``$CC``, then ``cc``, ``gcc``, ``clang``).
        force: rebuild even when a cached build exists.

    Raises:
        SimulatorBuildError: no compiler, or compilation failed (with its output).
    """
    compiler = _compiler(cc)
    source = resources.files("rkllm_core.sim").joinpath("rknn_sim.c").read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(_CFLAGS).encode()]))
    out_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = out_dir / key.hexdigest()[:16] / "librknnrt-sim.so"
    with _build_lock:
        if target.is_file() and not force:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "rknn_sim.c"
            src.write_bytes(source)
            built = Path(tmp) / target.name
            cmd = [compiler, *_CFLAGS, str(src), "-o", str(built)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SimulatorBuildError(f"building the RKNN simulator failed: {' '.join(cmd)}\n{proc.stderr}")
            os.replace(built, target)
    return target


def make_encoder(
    directory: str | os.PathLike[str],
    filename: str = "qwen2_5_vl_3b_vision_rk3588.rknn",
    *,
    height: int = 448,
    width: int = 448,
    fmt: str = "nhwc",
    input_type: str = "uint8",
    tokens: int = 196,
    embed: int = 64,
    outputs: int = 1,
    platform: str = "rk3588",
    size_mb: float = 0.0,
) -> Path:
    """Write a vision encoder file the RKNN simulator accepts (sparse when ``size_mb`` is given).

    The simulated encoder reports ``[1, height, width, 3]`` (``fmt="nhwc"``) or ``[1, 3, height, width]``
    (``"nchw"``) as its input and ``outputs`` outputs of ``[1, tokens, embed]``; it accepts ``uint8``
    pixels, or ``float32`` ones (host-normalised) with ``input_type="float32"``. Each token is the mean
    colour of one region of the image (see ``rknn_sim.c``).

    Args:
        directory: where to write it.
        filename: the file name.
        height: the input height in pixels.
        width: the input width in pixels.
        fmt: ``"nhwc"`` or ``"nchw"``.
        input_type: ``"uint8"`` or ``"float32"``.
        tokens: tokens per image (output dim 1).
        embed: the embedding width per output (output dim 2).
        outputs: the number of outputs (4 for a Qwen3-VL "deepstack" encoder).
        platform: the SoC it was converted for (decides the valid core masks).
        size_mb: the apparent file size.
    """
    if fmt not in ("nhwc", "nchw") or input_type not in ("uint8", "float32"):
        raise ValueError("fmt must be 'nhwc' or 'nchw' and input_type 'uint8' or 'float32'")
    path = Path(directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = dict(height=height, width=width, fmt=fmt, input=input_type, tokens=tokens, embed=embed)
    facts.update(outputs=outputs, platform=platform)
    header = ("RKNNSIM 1\n" + "".join(f"{k}={v}\n" for k, v in facts.items()) + "\n").encode()
    size = max(len(header), int(size_mb * 1024 * 1024))
    if not _holds(path, header, size):
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(size)
    return path


class RKNNSimulatorControl:
    """Read the RKNN simulator's counters and change its settings.

    Settings (``set``): ``run_delay_ms`` (each ``rknn_run`` takes this long), ``fail_core_mask``,
    ``fail_run`` and ``fail_outputs_get`` (non-zero: that call returns ``RKNN_ERR_FAIL``).
    """

    SETTINGS = ("run_delay_ms", "fail_core_mask", "fail_run", "fail_outputs_get")

    def __init__(self, library_path: str | os.PathLike[str]) -> None:
        self._lib = ctypes.CDLL(os.fspath(library_path))
        lib = self._lib
        lib.rknn_sim_counter.restype, lib.rknn_sim_counter.argtypes = ctypes.c_longlong, [ctypes.c_char_p]
        lib.rknn_sim_set.restype, lib.rknn_sim_set.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_double]
        lib.rknn_sim_reset_counters.restype, lib.rknn_sim_reset_counters.argtypes = None, []

    def counter(self, name: str) -> int:
        """Return one counter (see :data:`RKNN_COUNTERS`)."""
        value = int(self._lib.rknn_sim_counter(name.encode()))
        if value < 0:
            raise KeyError(name)
        return value

    def counters(self) -> dict[str, int]:
        """Return all counters."""
        return {name: self.counter(name) for name in RKNN_COUNTERS}

    def reset(self) -> None:
        """Reset the counters (not ``live_contexts``, ``outputs_outstanding`` or ``active_runs``)."""
        self._lib.rknn_sim_reset_counters()

    def set(self, key: str, value: float) -> None:
        """Change a setting (see the class docstring)."""
        if self._lib.rknn_sim_set(key.encode(), float(value)) != 0:
            raise KeyError(key)
