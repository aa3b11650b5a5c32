"""Library lookup and ABI selection, including detection on purpose-built fake runtimes."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from rkllm_core.errors import ABIError, LibraryNotFoundError, RKLLMError, UnsupportedRuntimeError
from rkllm_core.native import library
from rkllm_core.native.library import find_library, git_blob_id, load_library, normalise_abi

from .conftest import needs_cc

# A fake runtime: the exported symbols, and rkllm_createDefaultParam writing a
# struct laid out like 1.2 or 1.3 (selected by FAKE_ABI), with an embedded
# version string. It never runs a model; it only feeds ABI detection.
FAKE_SRC = r"""
#include <stdint.h>
#include <string.h>
#include <stdbool.h>
typedef struct { int32_t base_domain_id; int8_t embed_flash; int8_t enabled_cpus_num; uint32_t enabled_cpus_mask;
                 uint8_t n_batch; int8_t use_cross_attn; uint8_t reserved[104]; } Ext;
#if FAKE_ABI == 13
typedef struct { const char* model_path; int32_t a, b, c, d; float e, f, g, h, i; int32_t j; float k, l;
                 bool skip, ignore_eos, is_async; Ext ext; } Param;
#else
typedef struct { const char* model_path; int32_t a, b, c, d; float e, f, g, h, i; int32_t j; float k, l;
                 bool skip, is_async; const char* img_start; const char* img_end; const char* img_content;
                 Ext ext; } Param;
#endif
const char* fake_version = VERSION_STRING;
Param rkllm_createDefaultParam(void) {
    Param p; memset(&p, 0, sizeof p);
    p.a = 512; p.c = 1; p.f = 0.8f; p.skip = true;
    p.ext.enabled_cpus_num = 4; p.ext.enabled_cpus_mask = 0xf0; p.ext.n_batch = 1;
#if FAKE_ABI != 13
    p.img_start = "<img>"; p.img_end = "</img>"; p.img_content = "<unk>";
#endif
    return p;
}
#define STUB(name) int name(void) { return (int)(intptr_t)fake_version[0] * 0; }
STUB(rkllm_init) STUB(rkllm_run) STUB(rkllm_abort) STUB(rkllm_destroy) STUB(rkllm_clear_kv_cache)
STUB(rkllm_set_chat_template) STUB(rkllm_run_async) STUB(rkllm_is_running) STUB(rkllm_load_lora)
STUB(rkllm_load_prompt_cache) STUB(rkllm_release_prompt_cache)
#if !OLD_RUNTIME
STUB(rkllm_set_function_tools) STUB(rkllm_get_kv_cache_size)
#endif
"""


def _build_fake(tmp_path: Path, name: str, *, abi: int, version: str, old: bool = False) -> Path:
    src = tmp_path / f"{name}.c"
    src.write_text(FAKE_SRC)
    out = tmp_path / f"{name}.so"
    cmd = [
        "cc",
        "-shared",
        "-fPIC",
        "-O1",
        f"-DFAKE_ABI={abi}",
        f"-DOLD_RUNTIME={int(old)}",
        f'-DVERSION_STRING="{version}"',
        str(src),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def test_explicit_missing_path_lists_it(tmp_path: Path) -> None:
    with pytest.raises(LibraryNotFoundError) as info:
        find_library(tmp_path / "nope.so")
    assert "nope.so" in str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, RKLLMError)


def test_env_path_wins_and_missing_env_path_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "librkllmrt.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv("RKLLM_LIB_PATH", str(tmp_path))  # a directory holding the library
    assert find_library() == lib
    monkeypatch.setenv("RKLLM_LIB_PATH", str(tmp_path / "missing.so"))
    with pytest.raises(LibraryNotFoundError, match="RKLLM_LIB_PATH"):
        find_library()


def test_not_found_lists_every_path_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_LIB_PATH", raising=False)
    candidates = [str(tmp_path / "a" / "librkllmrt.so"), str(tmp_path / "b" / "librkllmrt.so")]
    monkeypatch.setattr(library, "candidate_paths", lambda: candidates)
    with pytest.raises(LibraryNotFoundError) as info:
        find_library()
    for c in candidates:
        assert c in str(info.value)
    assert len(info.value.tried) == 2
    assert "RKLLM_LIB_PATH" in str(info.value) and "simulator" in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"), [("1.2", "1.2"), ("1.3", "1.3"), ("1.2.3", "1.2"), ("v1.2.1", "1.2"), ("1.3.0", "1.3")]
)
def test_normalise_abi(value: str, expected: str) -> None:
    assert normalise_abi(value) == expected


@pytest.mark.parametrize("value", ["1.2.0", "1.1.4"])
def test_old_versions_are_unsupported(value: str) -> None:
    with pytest.raises(UnsupportedRuntimeError):
        normalise_abi(value)


def test_garbage_abi_is_refused() -> None:
    with pytest.raises(ABIError, match="expected '1.2'"):
        normalise_abi("2.0-beta")


def test_git_blob_id_matches_git(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello\n")
    # `printf 'hello\n' | git hash-object --stdin`
    assert git_blob_id(f) == "ce013625030ba8dba906f756967f9e9ca394464a"


@needs_cc
@pytest.mark.parametrize(("abi", "version", "expected"), [(13, "1.3.0", "1.3"), (12, "1.2.3", "1.2")])
def test_detection_needs_two_agreeing_signals(
    tmp_path: Path,
    abi: int,
    version: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("RKLLM_ABI", raising=False)
    path = _build_fake(tmp_path, f"fake{abi}", abi=abi, version=version)
    with caplog.at_level(logging.INFO, logger="rkllm_core.native.library"):
        lib = load_library(path)
    assert lib.abi == expected
    assert "probe fits only" in lib.abi_reason and "version strings" in lib.abi_reason
    assert any(f"ABI {expected}" in r.getMessage() for r in caplog.records)


@needs_cc
def test_conflicting_signals_refuse_to_guess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_ABI", raising=False)
    path = _build_fake(tmp_path, "liar", abi=13, version="1.2.3")  # 1.3 layout, 1.2 version string
    with pytest.raises(ABIError) as info:
        load_library(path)
    assert "RKLLM_ABI=1.2" in str(info.value) and "RKLLM_ABI=1.3" in str(info.value)


@needs_cc
def test_single_signal_is_not_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_ABI", raising=False)
    path = _build_fake(tmp_path, "noversion", abi=13, version="x")
    with pytest.raises(ABIError, match="cannot establish"):
        load_library(path)


@needs_cc
def test_an_explicit_abi_settles_what_the_evidence_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_ABI_FORCE", raising=False)
    path = _build_fake(tmp_path, "noversion2", abi=13, version="x")  # one heuristic alone: not conclusive
    monkeypatch.setenv("RKLLM_ABI", "1.3")
    lib = load_library(path)
    assert lib.abi == "1.3" and lib.abi_reason == "set by RKLLM_ABI, agreeing with default-param probe"


@needs_cc
def test_an_explicit_abi_against_the_evidence_is_refused_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim_paths: dict[str, Path]
) -> None:
    monkeypatch.delenv("RKLLM_ABI_FORCE", raising=False)
    monkeypatch.setenv("RKLLM_ABI", "1.3")
    probe_only = _build_fake(tmp_path, "probe13", abi=13, version="x")
    with pytest.raises(ABIError) as err:  # the argument beats the environment, the evidence beats both
        load_library(probe_only, abi="1.2")
    assert "asks for ABI 1.2" in str(err.value) and "default-param probe -> 1.3" in str(err.value)
    assert "RKLLM_ABI_FORCE=1" in str(err.value)
    both = _build_fake(tmp_path, "both13", abi=13, version="1.3.0")
    with pytest.raises(ABIError, match="version strings -> 1.3"):
        load_library(both, abi="1.2")
    monkeypatch.setenv("RKLLM_ABI", "1.2")
    with pytest.raises(ABIError, match="simulator marker -> 1.3"):
        load_library(sim_paths["1.3"])
    monkeypatch.setenv("RKLLM_ABI_FORCE", "1")  # the dangerous switch
    forced = load_library(probe_only, abi="1.2")
    assert forced.abi == "1.2" and forced.abi_reason.startswith("forced by argument")


@needs_cc
def test_runtime_older_than_1_2_1_is_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_ABI", raising=False)
    path = _build_fake(tmp_path, "old", abi=12, version="1.2.0", old=True)
    with pytest.raises(UnsupportedRuntimeError, match="older than 1.2.1"):
        load_library(path)
    with pytest.raises(UnsupportedRuntimeError):
        load_library(path, abi="1.2")


@needs_cc
def test_known_hash_is_definitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_ABI", raising=False)
    path = _build_fake(tmp_path, "hashed", abi=13, version="x")  # heuristics alone would refuse
    monkeypatch.setitem(library.KNOWN_BUILDS, git_blob_id(path), ("1.3.0", "test"))
    lib = load_library(path)
    assert lib.abi == "1.3" and lib.version == "1.3.0" and "official" in lib.abi_reason


def test_not_a_library_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "librkllmrt.so"
    bogus.write_text("not an ELF file")
    with pytest.raises(LibraryNotFoundError, match="cannot load"):
        load_library(bogus, abi="1.3")


def test_simulator_is_detected_by_its_marker(sim_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_ABI", raising=False)
    for abi, path in sim_paths.items():
        lib = load_library(path)
        assert lib.abi == abi and lib.is_simulator
        assert "simulator" in lib.abi_reason


def test_each_abi_has_a_backend_that_builds_its_own_structs(sim_paths: dict[str, Path]) -> None:
    import ctypes

    from rkllm_core.errors import InvalidParameterError
    from rkllm_core.native import abi12, abi13
    from rkllm_core.native.backend import RunRequest
    from rkllm_core.params import SamplingParams

    full = SamplingParams(1.0, 0.9, 40, 1.1, 0.0, 0.0, 0, 5.0, 0.1)
    req = RunRequest(b"user", b"hi", None, False, True, None, None, None, None)
    for abi, module in (("1.2", abi12), ("1.3", abi13)):
        backend = load_library(sim_paths[abi]).backend
        assert backend.abi == abi and backend.per_run_sampling == (abi == "1.3")
        inp, infer, keep = backend.run_structs(req)
        assert type(inp) is module.RKLLMInput and type(infer) is module.RKLLMInferParam
        assert ctypes.sizeof(infer) == (32 if abi == "1.2" else 40) and infer.keep_history == 1 and inp in keep
    per_run = RunRequest(b"user", b"hi", None, False, False, full, 16, None, None)
    _, infer, _ = load_library(sim_paths["1.3"]).backend.run_structs(per_run)
    assert infer.max_new_tokens == 16 and infer.sampling_params.contents.top_k == 40
    with pytest.raises(InvalidParameterError, match="1.3 runtime"):
        load_library(sim_paths["1.2"]).backend.run_structs(per_run)


@needs_cc
def test_a_1_3_x_without_a_fingerprint_is_accepted_on_the_usual_evidence_and_says_what_it_assumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("RKLLM_ABI", raising=False)
    path = _build_fake(tmp_path, "rt131", abi=13, version="1.3.1")  # no fingerprint of ours
    with caplog.at_level(logging.WARNING, logger="rkllm_core.native.library"):
        lib = load_library(path)
    assert lib.abi == "1.3" and lib.version == "1.3.1"
    assert lib.assumed == ("runtime 1.3.1 has no known fingerprint: its struct layouts are assumed to be those of "
                           "the 1.3.0 header",)
    assert "assumed to be those of the 1.3.0 header (unverified)" in caplog.text
    # One signal alone is still not enough, whatever the version says.
    with pytest.raises(ABIError, match="cannot establish"):
        load_library(_build_fake(tmp_path, "rt131-liar", abi=12, version="1.3.1"))


def test_a_known_build_or_the_simulator_assumes_nothing(sim_paths: dict[str, Path]) -> None:
    assert load_library(sim_paths["1.3"]).assumed == ()
