"""The librknnrt mirrors match rknn_api.h 2.3.2 byte for byte, and the library is found and checked.

The expected layout is a copy of the measured one (tests/data/layout-rknn-2.3.2-lp64.json), so
this runs without ../shared.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_core.errors import LibraryNotFoundError, NativeError, RKNNError
from rkllm_core.native import rknn
from tests.conftest import needs_cc

LAYOUT = json.loads((Path(__file__).parent / "data" / "layout-rknn-2.3.2-lp64.json").read_text())
MIRRORED = [
    "rknn_input_output_num",
    "rknn_tensor_attr",
    "rknn_sdk_version",
    "rknn_mem_size",
    "rknn_custom_string",
    "rknn_init_extend",
    "rknn_run_extend",
    "rknn_output_extend",
    "rknn_input",
    "rknn_output",
]
lp64 = pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="the measured layout is LP64")


@lp64
@pytest.mark.parametrize("name", MIRRORED)
def test_struct_size_alignment_and_fields_match_the_header(name: str) -> None:
    cls = getattr(rknn, name)
    facts = LAYOUT[name]
    assert ctypes.sizeof(cls) == facts["size"]
    assert ctypes.alignment(cls) == facts["align"]
    for field, where in facts["fields"].items():
        descriptor = getattr(cls, field)
        assert (descriptor.offset, descriptor.size) == (where["offset"], where["size"]), field


@lp64
def test_every_field_the_header_lists_is_mirrored() -> None:
    for name in MIRRORED:
        mirrored = {f[0] for f in getattr(rknn, name)._fields_}
        assert set(LAYOUT[name]["fields"]) <= mirrored, name


def test_context_is_pointer_sized() -> None:
    assert ctypes.sizeof(rknn.rknn_context) == ctypes.sizeof(ctypes.c_void_p)


def test_enum_values_are_the_headers() -> None:
    assert [rknn.RKNNQueryCmd.RKNN_QUERY_IN_OUT_NUM, rknn.RKNNQueryCmd.RKNN_QUERY_INPUT_ATTR] == [0, 1]
    assert [rknn.RKNNQueryCmd.RKNN_QUERY_OUTPUT_ATTR, rknn.RKNNQueryCmd.RKNN_QUERY_SDK_VERSION] == [2, 5]
    assert [int(rknn.RKNNTensorType.RKNN_TENSOR_UINT8), int(rknn.RKNNTensorType.RKNN_TENSOR_FLOAT32)] == [3, 0]
    assert [int(rknn.RKNNTensorFormat.RKNN_TENSOR_NCHW), int(rknn.RKNNTensorFormat.RKNN_TENSOR_NHWC)] == [0, 1]
    assert [int(rknn.RKNNCoreMask.RKNN_NPU_CORE_0_1), int(rknn.RKNNCoreMask.RKNN_NPU_CORE_0_1_2)] == [3, 7]
    assert sorted(rknn.ERROR_NAMES) == list(range(-13, 1))


def test_check_names_the_call_and_its_code() -> None:
    rknn.check(0, "rknn_run")
    with pytest.raises(RKNNError, match=r"rknn_run returned -7 \(RKNN_ERR_CTX_INVALID\)") as info:
        rknn.check(-7, "rknn_run")
    assert isinstance(info.value, NativeError) and isinstance(info.value, RuntimeError)
    assert (info.value.code, info.value.function) == (-7, "rknn_run")
    with pytest.raises(RKNNError, match=r"returned -99 \(unknown error\) \(enc.rknn\)"):
        rknn.check(-99, "rknn_init", "enc.rknn")


def test_importing_the_binding_and_vision_loads_neither_library_nor_pillow() -> None:
    code = (
        "import sys, rkllm_core.native.rknn as r, rkllm_core.vision;"
        "assert not r._loaded; assert 'PIL' not in sys.modules, 'Pillow imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rknn_lib_path_that_does_not_exist_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RKNN_LIB_PATH", str(tmp_path / "nope.so"))
    with pytest.raises(LibraryNotFoundError, match="nope.so") as info:
        rknn.find_rknn_library()
    assert "RKNN_LIB_PATH" in info.value.tried[0]


def test_a_directory_in_rknn_lib_path_means_the_library_inside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "librknnrt.so").write_bytes(b"")
    monkeypatch.setenv("RKNN_LIB_PATH", str(tmp_path))
    assert rknn.find_rknn_library() == tmp_path / "librknnrt.so"
    other = tmp_path / "other.so"
    other.write_bytes(b"")
    assert rknn.find_rknn_library(other) == other  # the argument comes first


def test_nothing_found_lists_every_place_and_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RKNN_LIB_PATH", raising=False)
    monkeypatch.setattr(rknn, "candidate_paths", lambda: [str(tmp_path / "a" / "librknnrt.so")])
    with pytest.raises(LibraryNotFoundError, match="RKNN_LIB_PATH") as info:
        rknn.find_rknn_library()
    assert len(info.value.tried) == 1 and str(tmp_path / "a") in info.value.tried[0]


def test_a_file_that_is_not_a_library_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "librknnrt.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(LibraryNotFoundError, match="cannot load"):
        rknn.load_rknn_library(fake)


@needs_cc
def test_a_library_without_the_rknn_symbols_is_refused(sim_paths: dict[str, Path]) -> None:
    with pytest.raises(LibraryNotFoundError, match="does not look like the RKNN runtime: missing rknn_init"):
        rknn.load_rknn_library(sim_paths["1.3"])  # the RKLLM simulator: a real library, the wrong one
