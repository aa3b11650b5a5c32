"""Every ctypes mirror must match the vendor header's layout byte for byte.

The expected numbers are copies of the layout facts measured from Rockchip's
headers (kept in tests/data so the test runs without ../shared). LP64 is
checked on the host directly; ILP32 (armhf) is checked by rebuilding each
structure with 4-byte pointers and sizes, which catches a pointer or size_t
declared as a fixed-width integer (or the reverse).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.native import abi12 as v1_2
from rkllm_core.native import abi13 as v1_3
from rkllm_core.native import structs as common

DATA = Path(__file__).parent / "data"
CASES = [
    ("1.2.3", "lp64", v1_2),
    ("1.2.3", "ilp32", v1_2),
    ("1.3.0", "lp64", v1_3),
    ("1.3.0", "ilp32", v1_3),
]

_POINTERISH = (ctypes.c_void_p, ctypes.c_char_p, ctypes._Pointer, ctypes._CFuncPtr)  # type: ignore[attr-defined]
_ilp32_cache: dict[type, type] = {}


def _ilp32(t: Any) -> Any:
    """Return the ILP32 twin of a ctypes type (pointers and size_t become 4 bytes)."""
    if isinstance(t, type) and issubclass(t, _POINTERISH):
        return ctypes.c_uint32
    if t is ctypes.c_size_t:
        return ctypes.c_uint32
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return _ilp32(t._type_) * t._length_
    if isinstance(t, type) and issubclass(t, ctypes.Structure | ctypes.Union):
        if t not in _ilp32_cache:
            base = ctypes.Union if issubclass(t, ctypes.Union) else ctypes.Structure
            ns: dict[str, Any] = {"_fields_": [(n, _ilp32(ft)) for n, ft, *_ in t._fields_]}
            if getattr(t, "_anonymous_", None):
                ns["_anonymous_"] = t._anonymous_
            _ilp32_cache[t] = type(t.__name__ + "_ilp32", (base,), ns)
        return _ilp32_cache[t]
    return t


def _resolve(module: Any, name: str) -> Any:
    return getattr(module, name, None) or getattr(common, name)


def _offset(cls: Any, dotted: str) -> int:
    total = 0
    for part in dotted.split("."):
        field = getattr(cls, part)
        total += field.offset
        types = {n: ft for n, ft, *_ in cls._fields_}
        if part not in types:  # a member of an anonymous union: stays at the union's offset
            anon = next(ft for n, ft, *_ in cls._fields_ if n in getattr(cls, "_anonymous_", ()))
            types = {n: ft for n, ft, *_ in anon._fields_}
        cls = types[part]
    return total


@pytest.mark.parametrize(("version", "model", "module"), CASES, ids=[f"{v}-{m}" for v, m, _ in CASES])
def test_layout_matches_vendor_header(version: str, model: str, module: Any) -> None:
    facts = json.loads((DATA / f"layout-{version}-{model}.json").read_text())
    mismatches = []
    for struct_name, spec in facts.items():
        cls = _resolve(module, struct_name)
        if model == "ilp32":
            cls = _ilp32(cls)
        if ctypes.sizeof(cls) != spec["size"]:
            mismatches.append(f"sizeof({struct_name}) = {ctypes.sizeof(cls)}, header says {spec['size']}")
        for field, expected in spec["fields"].items():
            got = _offset(cls, field)
            if got != expected:
                mismatches.append(f"offsetof({struct_name}.{field}) = {got}, header says {expected}")
    assert not mismatches, "\n".join(mismatches)


def test_every_header_struct_is_covered() -> None:
    for version, module in (("1.2.3", v1_2), ("1.3.0", v1_3)):
        facts = json.loads((DATA / f"layout-{version}-lp64.json").read_text())
        for name in facts:
            assert _resolve(module, name) is not None


def test_abi_specific_differences() -> None:
    # The changes NOTES.md lists for the 1.3 break, checked explicitly.
    assert hasattr(v1_3.RKLLMParam, "ignore_eos_token") and not hasattr(v1_2.RKLLMParam, "ignore_eos_token")
    assert hasattr(v1_2.RKLLMParam, "img_start") and not hasattr(v1_3.RKLLMParam, "img_start")
    assert hasattr(v1_3.RKLLMInferParam, "sampling_params") and not hasattr(v1_2.RKLLMInferParam, "sampling_params")
    assert v1_2.RKLLMMultiModelInput is v1_2.RKLLMMultiModalInput
    assert ctypes.sizeof(v1_3.RKLLMCallback) == 6 * ctypes.sizeof(ctypes.c_void_p)


def test_import_loads_no_library_and_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, rkllm_core, rkllm_core.runtime, rkllm_core.native.library;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('langchain_core','langchain','llama_index')];"
        "import ctypes;"
        "maps=open('/proc/self/maps').read() if sys.platform.startswith('linux') else '';"
        "assert 'rkllmrt' not in maps, 'library loaded at import';"
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""}, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(("version", "model", "module"), CASES, ids=[f"{v}-{m}" for v, m, _ in CASES])
def test_the_header_sizes_doctor_checks_are_the_header_facts(version: str, model: str, module: Any) -> None:
    facts = json.loads((DATA / f"layout-{version}-{model}.json").read_text())
    table = common.HEADER_SIZES[version[:3]][8 if model == "lp64" else 4]
    assert table and {name: facts[name]["size"] for name in table} == table
