"""Finding ``librkllmrt.so``, establishing its ABI, and loading it.

Lookup order for the library: the explicit ``path`` argument, then the
``RKLLM_LIB_PATH`` environment variable (a file, or a directory holding
``librkllmrt.so``), then the usual places (``ctypes.util.find_library``,
``/usr/lib``, ``/usr/local/lib``, the multiarch directories, the current
directory). A failure lists every path tried.

ABI selection: the explicit ``abi`` argument, then ``RKLLM_ABI`` (``1.2`` or
``1.3``), then detection. Detection never guesses:

1. the git blob hash of the file against the table of official builds
   (definitive);
2. the simulator's marker symbol ``rkllm_sim_abi`` (definitive);
3. otherwise two independent heuristics must agree: version strings embedded
   in the binary, and a probe of ``rkllm_createDefaultParam()`` whose result
   is read into a buffer large enough for both layouts and checked for
   plausibility under each layout. If either is inconclusive or they
   disagree, :class:`~rkllm_core.errors.ABIError` explains how to set the ABI.

Runtimes <= 1.2.0 (no ``rkllm_set_function_tools``/``rkllm_get_kv_cache_size``)
are refused with :class:`~rkllm_core.errors.UnsupportedRuntimeError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..errors import ABIError, LibraryNotFoundError, UnsupportedRuntimeError
from . import abi12, abi13, functions, structs
from .backend import Backend, backend_for

logger = logging.getLogger(__name__)

LIBRARY_NAME = "librkllmrt.so"
ENV_FORCE_ABI = "RKLLM_ABI_FORCE"
"""Set to ``1`` to use ``RKLLM_ABI``/``abi=`` even where the library's own evidence names another ABI (dangerous)."""

# Git blob ids (`git hash-object librkllmrt.so`) of Rockchip's published builds.
KNOWN_BUILDS: dict[str, tuple[str, str]] = {
    "34167b32f99cb7ab19e21fb579fb750d96b878f1": ("1.3.0", "aarch64"),
    "0084abc34ab43359cfa9fd5d4c92ece34127dbd0": ("1.2.3", "aarch64"),
    "8ed9cca16f8d5ad8f7cdd7d393de6561182b3395": ("1.2.2", "aarch64"),
    "6b9439d59f2fe4bb8ef5ee2b09c102f1bf993da9": ("1.2.1", "aarch64"),
    "17c9063b46168c4e7d093d6fedb097874f92d076": ("1.3.0", "armhf"),
    "fe1ca6849603a770c54f82d26b826a120c79a01a": ("1.2.3", "armhf"),
}

_VERSION_RE = re.compile(rb"(?<![0-9A-Za-z.])(1\.[0-9]\.[0-9]{1,2})(?:b[0-9]+)?(?![0-9.])")


def version_to_abi(version: str) -> str | None:
    """Map a runtime version such as ``1.2.3`` to its ABI (``1.2``/``1.3``), None if unsupported."""
    parts = version.split(".")
    try:
        major, minor, patch = int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (ValueError, IndexError):
        return None
    if (major, minor) == (1, 2) and patch >= 1:
        return "1.2"
    if (major, minor) == (1, 3):
        return "1.3"
    return None


def normalise_abi(value: str) -> str:
    """Accept ``1.2``, ``1.2.3``, ``v1.3`` etc. and return ``1.2`` or ``1.3``.

    Raises:
        ABIError: for anything else, including unsupported versions.
    """
    text = value.strip().lower().lstrip("v")
    if text in functions.SUPPORTED_ABIS:
        return text
    abi = version_to_abi(text)
    if abi is None:
        if re.fullmatch(r"1\.[01](\.\d+)?|1\.2\.0", text):
            raise UnsupportedRuntimeError(
                f"RKLLM runtime {value} is not supported; use runtime 1.2.1-1.2.3 (ABI 1.2) or 1.3.x (ABI 1.3)"
            )
        raise ABIError(f"unknown RKLLM ABI {value!r}; expected '1.2' (runtime 1.2.1-1.2.3) or '1.3' (runtime 1.3.x)")
    return abi


def git_blob_id(path: Path) -> str:
    """Return ``git hash-object`` of a file (SHA-1 over ``blob <size>``, a NUL byte, then the data)."""
    data = path.read_bytes()
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def candidate_paths() -> list[str]:
    """Return the default places to look for the runtime, in order (no environment)."""
    found = ctypes.util.find_library("rkllmrt")
    dirs = [
        "/usr/lib",
        "/usr/local/lib",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/arm-linux-gnueabihf",
        "/usr/lib64",
        "/lib",
        os.path.join(sys.prefix, "lib"),
        os.getcwd(),
    ]
    paths = [found] if found else []
    paths += [os.path.join(d, LIBRARY_NAME) for d in dirs]
    return list(dict.fromkeys(paths))


def find_library(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the runtime library.

    Args:
        path: an explicit file (or directory containing ``librkllmrt.so``).

    Returns:
        The path of an existing file.

    Raises:
        LibraryNotFoundError: nothing was found; the message lists every path tried.
    """
    return locate_library(
        LIBRARY_NAME,
        path,
        "RKLLM_LIB_PATH",
        candidate_paths(),
        "Install Rockchip's runtime (rknn-llm, rkllm-runtime/Linux/librkllm_api) or set RKLLM_LIB_PATH. Without a "
        "board, build the simulator: python -m rkllm_core.sim",
    )


def locate_library(
    file_name: str, path: str | os.PathLike[str] | None, env_var: str, candidates: Sequence[str], hint: str
) -> Path:
    """Find a shared library: ``path``, else ``$env_var``, else the first of ``candidates`` that exists.

    A directory stands for ``file_name`` in it; a bare soname among the candidates (from
    ``ctypes.util.find_library``) is left to the loader.

    Raises:
        LibraryNotFoundError: nothing was found; the message lists every path tried, then ``hint``.
    """
    tried: list[str] = []

    def resolve(value: str, origin: str) -> Path | None:
        p = Path(value).expanduser()
        if p.is_dir():
            p = p / file_name
        tried.append(f"{p} ({origin})")
        return p if p.is_file() else None

    if path is not None:
        hit = resolve(os.fspath(path), "argument")
        if hit is None:
            raise LibraryNotFoundError(f"{file_name} not found at {tried[0]}", tried)
        return hit
    env = os.environ.get(env_var)
    if env:
        hit = resolve(env, env_var)
        if hit is None:
            raise LibraryNotFoundError(f"{env_var} points to {tried[0]}, which does not exist; fix or unset it", tried)
        return hit
    for candidate in candidates:
        if os.sep not in candidate:  # a bare soname from find_library: let the loader resolve it
            tried.append(f"{candidate} (ctypes.util.find_library)")
            return Path(candidate)
        hit = resolve(candidate, "default")
        if hit is not None:
            return hit
    raise LibraryNotFoundError(f"{file_name} not found; tried: {', '.join(tried)}. {hint}", tried)


@dataclass(frozen=True)
class AbiDecision:
    """The ABI chosen for a library and the evidence behind it."""

    abi: str
    reason: str
    version: str | None = None
    signals: dict[str, str] = field(default_factory=dict)
    assumed: tuple[str, ...] = ()
    """What the decision takes for granted rather than verified (shown by ``rkllm doctor``)."""


def _versions_in(data: bytes) -> set[str]:
    return {m.group(1).decode() for m in _VERSION_RE.finditer(data)}


def _strings_signal(data: bytes) -> tuple[str | None, str]:
    versions = _versions_in(data)
    abis = {a for a in (version_to_abi(v) for v in versions) if a is not None}
    if len(abis) == 1:
        abi = abis.pop()
        return abi, f"version strings {sorted(versions)} -> {abi}"
    if not abis:
        return None, f"no supported version string (found {sorted(versions) or 'none'})"
    return None, f"conflicting version strings {sorted(versions)}"


def _probe_signal(lib: ctypes.CDLL) -> tuple[str | None, str]:
    """Read ``rkllm_createDefaultParam()`` into a 1.2-sized buffer and test both layouts.

    The 1.2 struct is the larger (208 vs 184 bytes on LP64), so the callee
    cannot write past the buffer whichever ABI it has.
    """
    fn = lib.rkllm_createDefaultParam
    fn.argtypes = []
    fn.restype = abi12.RKLLMParam
    try:
        p12 = fn()
    except Exception as exc:  # pragma: no cover - a crash would not reach here anyway
        return None, f"probe failed: {exc}"
    raw = bytes(memoryview(p12).cast("B"))
    p13 = abi13.RKLLMParam.from_buffer_copy(raw[: ctypes.sizeof(abi13.RKLLMParam)])
    ptr_min = 4096

    def plausible_extend(e: structs.RKLLMExtendParam) -> bool:
        return (
            0 <= e.base_domain_id <= 64
            and 0 <= e.enabled_cpus_num <= 8
            and e.enabled_cpus_mask < 256
            and e.n_batch <= 8
            and e.use_cross_attn in (0, 1)
        )

    def ptr_ok(offset: int) -> bool:
        addr = ctypes.c_void_p.from_buffer_copy(raw, offset).value
        return addr is None or addr >= ptr_min

    img_offsets = [structs.field_offset(abi12.RKLLMParam, n) for n in ("img_start", "img_end", "img_content")]
    ok12 = raw[57] in (0, 1) and all(ptr_ok(o) for o in img_offsets) and plausible_extend(p12.extend_param)
    ok13 = raw[57] in (0, 1) and raw[58] in (0, 1) and plausible_extend(p13.extend_param)
    # The probe only counts when exactly one reading makes sense and the
    # extend params carry non-zero evidence (an all-zero tail fits both).
    evidence = p13.extend_param.enabled_cpus_num or p13.extend_param.n_batch or p13.extend_param.enabled_cpus_mask
    if ok12 and not ok13:
        return "1.2", "default-param probe fits only the 1.2 layout"
    if ok13 and not ok12 and evidence:
        return "1.3", "default-param probe fits only the 1.3 layout"
    return None, f"default-param probe inconclusive (fits 1.2: {ok12}, fits 1.3: {ok13})"


@dataclass(frozen=True)
class _Evidence:
    """What a library says about its own ABI."""

    decision: AbiDecision | None  # conclusive: a known build, the simulator's marker, or two agreeing heuristics
    named: dict[str, str]  # signal -> the ABI it names (only signals that name one)
    signals: dict[str, str]


def _check_symbols(path: Path, lib: ctypes.CDLL) -> None:
    missing = [s for s in functions.REQUIRED_SYMBOLS if not hasattr(lib, s)]
    if missing:
        raise ABIError(f"{path} does not look like the RKLLM runtime: missing {', '.join(missing)}")
    if not all(hasattr(lib, s) for s in functions.SYMBOLS_SINCE_1_2_1):
        raise UnsupportedRuntimeError(
            f"{path} is an RKLLM runtime older than 1.2.1 (no rkllm_set_function_tools); "
            "it is not supported: install runtime 1.2.1-1.2.3 or 1.3.x"
        )


def _evidence(path: Path, lib: ctypes.CDLL) -> _Evidence:
    signals: dict[str, str] = {}
    try:
        blob = git_blob_id(path)
    except OSError as exc:  # e.g. a bare soname resolved by the loader
        blob = ""
        signals["hash"] = f"unreadable ({exc})"
    if blob in KNOWN_BUILDS:
        version, arch = KNOWN_BUILDS[blob]
        abi = version_to_abi(version)
        assert abi is not None
        why = f"official {arch} build of runtime {version} (git blob {blob[:12]})"
        return _Evidence(AbiDecision(abi, why, version), {"fingerprint": abi}, {"hash": why})
    if blob:
        signals["hash"] = f"unknown build (git blob {blob[:12]})"
    if hasattr(lib, "rkllm_sim_abi"):
        marker = lib.rkllm_sim_abi
        marker.restype, marker.argtypes = ctypes.c_int, []
        value = int(marker())
        abi = {12: "1.2", 13: "1.3"}.get(value)
        if abi is None:
            raise ABIError(f"{path}: simulator reports unknown ABI {value}")
        sim_version: str | None = None
        if hasattr(lib, "rkllm_sim_version"):
            lib.rkllm_sim_version.restype, lib.rkllm_sim_version.argtypes = ctypes.c_char_p, []
            raw_version = lib.rkllm_sim_version()
            sim_version = raw_version.decode() if raw_version else None
        decision = AbiDecision(abi, "simulator marker symbol rkllm_sim_abi", sim_version, signals)
        return _Evidence(decision, {"simulator marker": abi}, signals)
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    s_abi, s_why = _strings_signal(data)
    p_abi, p_why = _probe_signal(lib)
    signals["strings"], signals["probe"] = s_why, p_why
    named = {k: v for k, v in (("version strings", s_abi), ("default-param probe", p_abi)) if v is not None}
    agreed = None
    if s_abi is not None and s_abi == p_abi:
        found = sorted(v for v in _versions_in(data) if version_to_abi(v) == s_abi)
        seen = found[-1] if found else None
        assumed = (_unverified_layout(seen, s_abi),)
        agreed = AbiDecision(s_abi, f"{s_why}; {p_why}", seen, signals, assumed)
    return _Evidence(agreed, named, signals)


_HEADER_OF_ABI: Final = {"1.2": "1.2.3", "1.3": "1.3.0"}


def _unverified_layout(version: str | None, abi: str) -> str:
    header = _HEADER_OF_ABI[abi]
    which = f"runtime {version}" if version else "this runtime build"
    return f"{which} has no known fingerprint: its struct layouts are assumed to be those of the {header} header"


def detect_abi(path: Path, lib: ctypes.CDLL) -> AbiDecision:
    """Establish the ABI of a loaded library from its evidence (see the module docstring).

    Raises:
        UnsupportedRuntimeError: the library is runtime <= 1.2.0.
        ABIError: the evidence is not conclusive.
    """
    _check_symbols(path, lib)
    evidence = _evidence(path, lib)
    if evidence.decision is not None:
        return evidence.decision
    details = "; ".join(f"{k}: {v}" for k, v in evidence.signals.items())
    raise ABIError(
        f"cannot establish the ABI of {path} ({details}). Set RKLLM_ABI=1.2 for runtime 1.2.1-1.2.3 or "
        "RKLLM_ABI=1.3 for runtime 1.3.x (the version is printed in the 'rkllm-runtime version' line "
        "when a model loads), or pass abi= explicitly"
    )


def _requested_decision(path: Path, lib: ctypes.CDLL, requested: str, source: str, force: bool) -> AbiDecision:
    """Honour an explicit ABI, unless the library's own evidence names another one (then only when forced)."""
    _check_symbols(path, lib)
    evidence = _evidence(path, lib)
    against = {signal: abi for signal, abi in evidence.named.items() if abi != requested}
    if against and not force:
        said = ", ".join(f"{signal} -> {abi}" for signal, abi in against.items())
        raise ABIError(
            f"{source} asks for ABI {requested} but {path} contradicts it: {said}. Calling a runtime with the "
            f"wrong ABI corrupts memory. Remove the setting (or set the ABI the evidence names); if you are sure, "
            f"set {ENV_FORCE_ABI}=1 to use ABI {requested} anyway"
        )
    if against:
        logger.warning(
            "%s: using ABI %s against the library's own evidence (%s) because %s=1",
            path,
            requested,
            against,
            ENV_FORCE_ABI,
        )
        forced = (f"ABI {requested} is forced against the library's own evidence ({against})",)
        return AbiDecision(requested, f"forced by {source} against {against}", None, evidence.signals, forced)
    decided = evidence.decision
    version = decided.version if decided is not None else None
    agree = f", agreeing with {', '.join(evidence.named)}" if evidence.named else ""
    assumed = decided.assumed if decided is not None else (_unverified_layout(version, requested),)
    return AbiDecision(requested, f"set by {source}{agree}", version, evidence.signals, assumed)


@dataclass(frozen=True)
class RuntimeLibrary:
    """A loaded runtime library with its ABI established."""

    path: Path
    abi: str
    abi_reason: str
    version: str | None
    functions: functions.RuntimeFunctions
    cdll: ctypes.CDLL = field(repr=False)
    assumed: tuple[str, ...] = ()
    """What the ABI choice takes for granted rather than verified (empty for a known build)."""
    backend: Backend = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", backend_for(self.functions))

    @property
    def is_simulator(self) -> bool:
        """True for the bundled simulator."""
        return hasattr(self.cdll, "rkllm_sim_abi")


_loaded: dict[tuple[str, str | None], RuntimeLibrary] = {}
_load_lock = threading.Lock()


def load_library(path: str | os.PathLike[str] | None = None, abi: str | None = None) -> RuntimeLibrary:
    """Find, load and bind the runtime library, establishing its ABI.

    Loaded libraries are cached per (path, requested ABI), so this is cheap
    after the first call.

    Args:
        path: explicit library path (else ``RKLLM_LIB_PATH``, else defaults).
        abi: explicit ABI ``1.2``/``1.3`` (else ``RKLLM_ABI``, else detection).

    Raises:
        LibraryNotFoundError: no library found or it could not be loaded.
        ABIError: the ABI could not be established.
        UnsupportedRuntimeError: runtime <= 1.2.0.
    """
    lib_path = find_library(path)
    requested = abi if abi is not None else os.environ.get("RKLLM_ABI") or None
    source = "argument" if abi is not None else "RKLLM_ABI"
    requested_abi = normalise_abi(requested) if requested else None
    key = (str(lib_path.resolve()) if os.sep in str(lib_path) else str(lib_path), requested_abi)
    with _load_lock:
        cached = _loaded.get(key)
        if cached is not None:
            return cached
        try:
            cdll = ctypes.CDLL(str(lib_path), mode=getattr(os, "RTLD_LOCAL", 0))
        except OSError as exc:
            raise LibraryNotFoundError(f"cannot load {lib_path}: {exc}", [str(lib_path)]) from exc
        if requested_abi is not None:
            force = os.environ.get(ENV_FORCE_ABI, "") == "1"
            decision = _requested_decision(lib_path, cdll, requested_abi, source, force)
        else:
            decision = detect_abi(lib_path, cdll)
        try:
            bound = functions.bind(cdll, decision.abi)
        except AttributeError as exc:
            raise ABIError(f"{lib_path} lacks a required RKLLM symbol: {exc}") from exc
        lib = RuntimeLibrary(lib_path, decision.abi, decision.reason, decision.version, bound, cdll, decision.assumed)
        logger.info("RKLLM runtime %s: ABI %s (%s)", lib_path, decision.abi, decision.reason)
        for assumption in decision.assumed:
            logger.warning("RKLLM runtime %s: %s (unverified)", lib_path, assumption)
        _loaded[key] = lib
        return lib
