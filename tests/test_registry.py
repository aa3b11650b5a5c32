"""Tests of models.names, models.registry_file, models.registry and board platform detection."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.board import detect_board_platform, platform_matches, soc_series
from rkllm_core.errors import InvalidParameterError, ModelFileError, ModelNotFoundError, NoModelsFoundError
from rkllm_core.filenames import ModelFacts, _separating_values, _strip_suffix, friendly_name, parse_model_filename
from rkllm_core.models import registry as registry_module
from rkllm_core.models.registry import DEFAULT_CONTEXT_SIZE, ModelInfo, ModelRegistry, default_model_dirs
from rkllm_core.models.registry_file import ModelDefaults, load_registry_file
from rkllm_core.params import SamplingParams

LOCAL_DATA = Path(__file__).resolve().parent / "data" / "model-filenames.jsonl"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "model-filenames.jsonl"
FACT_FIELDS = ("family", "size", "variant", "dtype", "opt", "hybrid", "npu_cores", "ctx", "platform")

# Lines of the data whose expected facts the parser deliberately does not
# reproduce: {file name: {field: why}}. Each listed field is asserted to still
# differ, so an exception that stops being one fails and gets removed.
KNOWN_EXCEPTIONS: dict[str, dict[str, str]] = {
    "OpenLongCoT-Base-Gemma2-2B-rk3588-w8a8-opt-1-hybrid-ratio-1.0.rkllm": {
        "family": "the data's 'gemma2 (OpenLongCoT fine-tune)' is a human annotation, not a name; the parser "
        "keeps the fine-tune's identity as 'openlongcot-gemma2' so it is not confused with Google's gemma2-2b",
    },
    "Vi-Qwen2-3B-RAG-rk3588-w8a8-opt-1-hybrid-ratio-0.0.rkllm": {
        "family": "the data's 'qwen2 (Vi-Qwen2 fine-tune)' is a human annotation; the parser gives 'vi-qwen2', "
        "which keeps the fine-tune apart from Qwen's own qwen2-3b",
    },
}


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _data_cases() -> list[Any]:
    cases = [pytest.param(rec, id=f"local:{rec['filename']}") for rec in _load(LOCAL_DATA)]
    if SHARED_DATA.is_file():
        cases += [pytest.param(rec, id=f"shared:{rec['filename']}") for rec in _load(SHARED_DATA)]
    else:
        cases.append(pytest.param(None, id="shared", marks=pytest.mark.skip(reason=f"{SHARED_DATA} not present")))
    return cases


def make_model(directory: Path, filename: str, size: int = 0) -> Path:
    """Create a (sparse) model file of ``size`` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.touch()
    os.truncate(path, size)
    return path


def backdate(*paths: Path) -> None:
    """Set mtimes well in the past, so a registry does not treat them as racy."""
    old = time.time() - 3600
    for path in paths:
        os.utime(path, (old, old))


# --------------------------------------------------------------------------
# File name parsing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("record", _data_cases())
def test_parse_matches_data(record: dict[str, Any]) -> None:
    facts = parse_model_filename(record["filename"])
    exceptions = KNOWN_EXCEPTIONS.get(record["filename"], {})
    expected = {f: record[f] for f in FACT_FIELDS if f not in exceptions}
    actual = {f: getattr(facts, f) for f in FACT_FIELDS if f not in exceptions}
    assert actual == expected
    for field in exceptions:
        assert getattr(facts, field) != record[field], f"{record['filename']}: {field} now agrees; drop the exception"


def test_local_data_copy_is_representative_and_faithful() -> None:
    local = _load(LOCAL_DATA)
    assert len(local) >= 40
    assert set(KNOWN_EXCEPTIONS) <= {rec["filename"] for rec in local}
    # Every naming style: vendor toolkit, org prefix + ctx, underscores, k-context, bare SoC, no family.
    names = {rec["filename"] for rec in local}
    for sample in (
        "Qwen3-4B-Thinking-2507-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm",
        "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm",
        "qwen3_0.6b_w4a16_g64_rk3562.rkllm",
        "internlm2_5-1_8b-chat-rk3588-w8a8-opt-0-hybrid-ratio-1.0.rkllm",
        "Qwen3-4B-16K.rkllm",
        "xiaoji_3576.rkllm",
        "decoder.w4a16.rkllm",
    ):
        assert sample in names
    if SHARED_DATA.is_file():
        shared = {rec["filename"]: rec for rec in _load(SHARED_DATA)}
        for rec in local:
            assert shared[rec["filename"]] == rec


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx-16384-rk3588.rkllm", {"ctx": 16384, "npu_cores": 3}),
        ("qwen3-0.6b-16k-w8a8.rkllm", {"ctx": 16384, "size": "0.6b"}),
        ("qwen3-4b-w8a8-ctx8k-rk3588s.RKLLM", {"ctx": 8192, "platform": "rk3588s"}),
        ("Phi-3-mini-128k-instruct-w8a8.rkllm", {"ctx": None, "family": "phi3"}),
        ("/models/sub/Qwen3-4B-16K.rkllm", {"family": "qwen3", "size": "4b", "ctx": 16384}),
        ("Meta-Llama-3-8B-Instruct-rk3588-w8a8.rkllm", {"family": "llama3", "size": "8b", "variant": "instruct"}),
        ("Qwen2.5-7B-Instruct-rk3588-w4a16_g128-opt-1-hybrid-ratio-0.5", {"dtype": "w4a16_g128", "hybrid": 0.5}),
    ],
)
def test_parse_more_styles(filename: str, expected: dict[str, Any]) -> None:
    facts = parse_model_filename(filename)
    assert {k: getattr(facts, k) for k in expected} == expected


def test_parse_unrecognised_name_keeps_label() -> None:
    facts = parse_model_filename("language_model_w8a8.rkllm")
    assert facts == ModelFacts(dtype="w8a8", label="language-model")


# --------------------------------------------------------------------------
# Friendly names
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", "qwen3-0.6b"),
        ("google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", "gemma3-270m"),
        ("gemma-3-1b-it_w8a8.rkllm", "gemma3-1b"),
        ("Qwen2.5-1.5B-Instruct-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm", "qwen2.5-1.5b"),
        ("DeepSeek-R1-Distill-Qwen-7B_W8A8_RK3588.rkllm", "deepseek-r1-distill-qwen-7b"),
        ("meta-llama_Llama-3.2-3B-rk3588.rkllm", "llama3.2-3b"),
        ("internlm2_5-1_8b-chat-rk3588-w8a8-opt-0-hybrid-ratio-1.0.rkllm", "internlm2.5-1.8b"),
        ("LLaMA-Mesh-rk3588-w8a8-opt-1-hybrid-ratio-1.0.rkllm", "llama-mesh"),
        ("Phi-3.5-mini-instruct-rk3588-w8a8_g256-opt-1-hybrid-ratio-0.5.rkllm", "phi3.5-mini"),
        ("xiaoji_3576.rkllm", "xiaoji"),
        ("decoder.w4a16.rkllm", "decoder"),
    ],
)
def test_friendly_name(filename: str, expected: str) -> None:
    assert friendly_name(parse_model_filename(filename)) == expected


# --------------------------------------------------------------------------
# Platform
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"xunlong,orangepi-5-max\0rockchip,rk3588\0", "rk3588"),
        (b"radxa,rock-5c\0rockchip,rk3588s\0", "rk3588s"),
        (b"rockchip,rk3576-evb\0rockchip,rk3576\0", "rk3576"),
        (b"raspberrypi,5-model-b\0brcm,bcm2712\0", None),
        (b"", None),
    ],
)
def test_detect_board_platform(tmp_path: Path, content: bytes, expected: str | None) -> None:
    compatible = tmp_path / "compatible"
    compatible.write_bytes(content)
    assert detect_board_platform(compatible) == expected


def test_detect_board_platform_unreadable(tmp_path: Path) -> None:
    assert detect_board_platform(tmp_path / "missing") is None


def test_platform_matches() -> None:
    assert soc_series("RK3588S") == "rk3588"
    assert soc_series("rv1126b") == "rv1126b"
    assert platform_matches("rk3588", "rk3588s")
    assert platform_matches("rk3588s", "rk3588")
    assert not platform_matches("rk3576", "rk3588")
    assert not platform_matches("rv1126", "rv1126b")
    assert not platform_matches(None, "rk3588")
    assert not platform_matches("rk3588", None)


# --------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------


def test_default_model_dirs_explicit_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_MODEL_DIR", str(tmp_path / "env"))
    assert default_model_dirs([tmp_path / "a", str(tmp_path / "b"), tmp_path / "a"]) == [
        tmp_path / "a",
        tmp_path / "b",
    ]
    assert default_model_dirs(tmp_path / "one") == [tmp_path / "one"]


def test_default_model_dirs_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_MODEL_DIR", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    assert default_model_dirs() == [tmp_path / "a", tmp_path / "b"]


def test_default_model_dirs_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_MODEL_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_model_dirs() == [tmp_path / "xdg" / "rkllm" / "models", tmp_path / "models"]
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dirs()[0] == tmp_path / "home" / ".local" / "share" / "rkllm" / "models"


def test_registry_uses_env_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model(tmp_path / "a", "Qwen3-0.6B-rk3588-w8a8.rkllm")
    make_model(tmp_path / "b", "gemma-3-1b-it_w8a8.rkllm")
    monkeypatch.setenv("RKLLM_MODEL_DIR", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    registry = ModelRegistry(platform=None)
    assert registry.model_dirs == [tmp_path / "a", tmp_path / "b"]
    assert [m.name for m in registry.models()] == ["gemma3-1b", "qwen3-0.6b"]


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


def test_discovery(tmp_path: Path) -> None:
    models = tmp_path / "models"
    big = make_model(models, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", 3 * 1024 * 1024)
    make_model(models / "gemma", "GEMMA-3-270M-IT_W8A8.RKLLM", 1000)
    make_model(models / "deep" / "deeper", "Qwen3-4B-rk3588-w8a8.rkllm")  # two levels down: not scanned
    make_model(models, ".hidden-Qwen3-8B.rkllm")
    make_model(models, "notes.txt")
    make_model(models, "Qwen3-1.7B.rkllm.part")
    registry = ModelRegistry([models, tmp_path / "missing"], platform=None)

    infos = registry.models()
    assert [m.name for m in infos] == ["gemma3-270m", "qwen3-0.6b"]
    gemma, qwen = infos
    assert gemma.path == (models / "gemma" / "GEMMA-3-270M-IT_W8A8.RKLLM").resolve()
    assert gemma.stem == "GEMMA-3-270M-IT_W8A8"
    assert gemma.file_size == 1000
    assert gemma.dtype == "w8a8"
    assert gemma.platform is None
    assert gemma.context_size == DEFAULT_CONTEXT_SIZE
    assert gemma.context_from_name is False
    assert qwen.path == big.resolve()
    assert qwen.filename == big.name
    assert qwen.size_mb == pytest.approx(3.0)
    assert qwen.platform == "rk3588"
    assert qwen.context_size == 16384
    assert qwen.context_from_name is True
    assert qwen.facts.npu_cores == 3
    assert len(registry) == 2


def test_context_from_k_token(tmp_path: Path) -> None:
    make_model(tmp_path, "Qwen2.5-3B-abliterated-16k-rk3588.rkllm")
    make_model(tmp_path, "Qwen2.5-1.5B-Instruct-4K.rkllm")
    registry = ModelRegistry([tmp_path], platform=None)
    assert registry.get("qwen2.5-3b-abliterated").context_size == 16384
    assert registry.get("qwen2.5-1.5b").context_size == 4096
    assert registry.get("qwen2.5-1.5b").context_from_name is True


def test_same_file_from_two_dirs_is_one_model(tmp_path: Path) -> None:
    real = make_model(tmp_path / "a" / "sub", "Qwen3-0.6B-rk3588-w8a8.rkllm")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "link.rkllm").symlink_to(real)
    registry = ModelRegistry([tmp_path / "a", tmp_path / "a" / "sub", tmp_path / "b"], platform=None)
    infos = registry.models()
    assert [(m.name, m.path) for m in infos] == [("qwen3-0.6b", real.resolve())]


def test_symlink_is_named_by_its_own_name(tmp_path: Path) -> None:
    blob = make_model(tmp_path / "cache" / "blobs", "5f3c0e9d1a", 2048)  # e.g. a Hugging Face cache blob
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Qwen3-4B-w8a8-rk3588-ctx8192.rkllm").symlink_to(blob)
    registry = ModelRegistry([tmp_path / "models"], platform=None)
    [info] = registry.models()
    assert (info.name, info.filename, info.path, info.file_size) == (
        "qwen3-4b",
        "Qwen3-4B-w8a8-rk3588-ctx8192.rkllm",
        blob.resolve(),
        2048,
    )
    assert info.context_size == 8192
    assert registry.get(str(tmp_path / "models" / "Qwen3-4B-w8a8-rk3588-ctx8192.rkllm")) == info


def test_empty_dirs_error_lists_them(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    registry = ModelRegistry([tmp_path / "empty", tmp_path / "missing"])
    assert registry.models() == []
    with pytest.raises(NoModelsFoundError) as caught:
        registry.get("qwen3-0.6b")
    message = str(caught.value)
    assert message == (
        f"no .rkllm models found; searched: {tmp_path / 'empty'}, {tmp_path / 'missing'} (missing); "
        "put model files there or set RKLLM_MODEL_DIR"
    )
    assert caught.value.searched == (str(tmp_path / "empty"), str(tmp_path / "missing"))
    assert isinstance(caught.value, LookupError)


# --------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[ModelRegistry, Path]:
    models = tmp_path / "models"
    make_model(models, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm")
    make_model(models, "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm")
    (models / "rkllm-models.toml").write_text('[models."qwen3-0.6b"]\naliases = ["Tiny"]\n')
    return ModelRegistry([models], platform=None), models


@pytest.mark.parametrize(
    "key",
    [
        "qwen3-0.6b",
        "QWEN3-0.6B",
        "  qwen3-0.6b  ",
        "tiny",
        "TINY",
        "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm",
        "qwen_qwen3-0.6b-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.RKLLM",
        "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588",
        "Qwen3 0.6B",
        "QWEN3_0.6B",
        "qwen 3 0.6b",
        "qwen_qwen3 0.6b w8a8 opt0 hybrid0 npu3 ctx16384 rk3588",
    ],
)
def test_lookup_by_every_key(two_models: tuple[ModelRegistry, Path], key: str) -> None:
    registry, _ = two_models
    assert registry.get(key).name == "qwen3-0.6b"
    assert key in registry


def test_loose_keys_keep_number_boundaries(tmp_path: Path) -> None:
    make_model(tmp_path, "Qwen3-1.5B-rk3588-w8a8.rkllm")
    registry = ModelRegistry([tmp_path], platform=None)
    assert registry.get("Qwen3 1.5B").name == "qwen3-1.5b"
    assert "qwen3-15b" not in registry  # a 15B is not a 1.5B
    assert "qwen315b" not in registry


def test_lookup_does_not_rescan(two_models: tuple[ModelRegistry, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    registry, _ = two_models
    registry.models()
    generation = registry.generation

    def no_listing(*args: object) -> None:
        raise AssertionError("a hit must not list directories")

    monkeypatch.setattr(os, "scandir", no_listing)
    for key in ("qwen3-0.6b", "tiny", "Gemma3 270M", "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588"):
        registry.get(key)
    assert registry.generation == generation


def test_lookup_by_path(
    two_models: tuple[ModelRegistry, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, models = two_models
    target = models / "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm"
    assert registry.get(str(target)).name == "qwen3-0.6b"
    assert registry.get(target).aliases == ("Tiny",)
    monkeypatch.chdir(tmp_path)
    assert registry.get(f"models/{target.name}").path == target.resolve()

    outside = make_model(tmp_path / "elsewhere", "Qwen3-4B-16K.rkllm", 4096)
    info = registry.get(str(outside))
    assert (info.name, info.path, info.context_size, info.file_size) == ("qwen3-4b", outside, 16384, 4096)
    assert info.name in registry and registry.get("qwen3-4b").path == outside  # it joined the registry
    assert info not in registry.models()  # but is not listed among the models of the directories
    monkeypatch.chdir(outside.parent)
    assert registry.get("Qwen3-4B-16K.rkllm").path == outside

    with pytest.raises(ModelFileError, match="does not exist"):
        registry.get(str(tmp_path / "nope" / "x.rkllm"))
    with pytest.raises(ModelFileError, match="not a .rkllm model file"):
        registry.get(str(models / "rkllm-models.toml"))


@pytest.mark.parametrize("typo", ["qwen3-06b", "qwen3-0.5b", "qwen3.0.6b"])
def test_did_you_mean(two_models: tuple[ModelRegistry, Path], typo: str) -> None:
    registry, _ = two_models
    with pytest.raises(ModelNotFoundError) as caught:
        registry.get(typo)
    assert str(caught.value) == f"no model '{typo}'; did you mean 'qwen3-0.6b'? known: gemma3-270m, qwen3-0.6b"
    assert caught.value.name == typo
    assert caught.value.suggestions[0] == "qwen3-0.6b"
    assert caught.value.known == ("gemma3-270m", "qwen3-0.6b")


def test_other_suggestions(two_models: tuple[ModelRegistry, Path]) -> None:
    registry, _ = two_models

    with pytest.raises(ModelNotFoundError) as caught:
        registry.get("gemma")  # a prefix
    assert caught.value.suggestions == ("gemma3-270m",)

    with pytest.raises(ModelNotFoundError) as caught:
        registry.get("mistral-7b")
    assert caught.value.suggestions == ()
    assert str(caught.value) == "no model 'mistral-7b'; known: gemma3-270m, qwen3-0.6b"
    assert not isinstance(caught.value, NoModelsFoundError)


# --------------------------------------------------------------------------
# Refresh
# --------------------------------------------------------------------------


def test_refresh_only_when_changed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model(models / "qwen3", "Qwen3-0.6B-rk3588-w8a8.rkllm")
    backdate(models, models / "qwen3")
    registry = ModelRegistry([models], platform=None)
    assert [m.name for m in registry.models()] == ["qwen3-0.6b"]
    assert registry.generation == 1
    assert registry.refresh() is False
    assert registry.generation == 1
    assert registry.refresh(force=True) is True
    assert registry.generation == 2

    make_model(models / "qwen3", "Qwen3-1.7B-rk3588-w8a8.rkllm")  # into a subdirectory
    assert registry.refresh() is True
    assert [m.name for m in registry.models()] == ["qwen3-0.6b", "qwen3-1.7b"]


def test_get_finds_a_file_dropped_in_and_refresh_drops_a_removed_one(tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = make_model(models, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    registry = ModelRegistry([models], platform=None)
    assert registry.get("qwen3-0.6b").path == first
    make_model(models, "gemma-3-1b-it_w8a8.rkllm")
    assert registry.get("gemma3-1b").filename == "gemma-3-1b-it_w8a8.rkllm"  # no explicit refresh
    first.unlink()
    registry.refresh()
    assert [m.name for m in registry.models()] == ["gemma3-1b"]
    with pytest.raises(ModelNotFoundError):
        registry.get("qwen3-0.6b")


def test_refresh_sees_an_edited_registry_file(tmp_path: Path) -> None:
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    toml = tmp_path / "rkllm-models.toml"
    toml.write_text('[models."qwen3-0.6b"]\ntemperature = 0.5\n')
    backdate(tmp_path, toml)
    registry = ModelRegistry([tmp_path], platform=None)
    assert registry.get("qwen3-0.6b").defaults.sampling.temperature == 0.5
    assert registry.refresh() is False
    toml.write_text('[models."qwen3-0.6b"]\ntemperature = 0.25\n')
    assert registry.refresh() is True
    assert registry.get("qwen3-0.6b").defaults.sampling.temperature == 0.25


# --------------------------------------------------------------------------
# Collisions
# --------------------------------------------------------------------------


def _names(tmp_path: Path, files: list[str], platform: str | None = None) -> list[str]:
    for filename in files:
        make_model(tmp_path, filename)
    return [m.name for m in ModelRegistry([tmp_path], platform=platform).models()]


def test_collision_by_dtype(tmp_path: Path) -> None:
    assert _names(tmp_path, ["Qwen3-0.6B-rk3588-w8a8.rkllm", "Qwen3-0.6B-rk3588-w4a16.rkllm"]) == [
        "qwen3-0.6b-w4a16",
        "qwen3-0.6b-w8a8",
    ]


def test_collision_by_platform(tmp_path: Path) -> None:
    assert _names(tmp_path, ["Qwen3-0.6B-rk3588-w8a8.rkllm", "Qwen3-0.6B-rk3576-w8a8.rkllm"]) == [
        "qwen3-0.6b-rk3576",
        "qwen3-0.6b-rk3588",
    ]


def test_collision_by_context(tmp_path: Path) -> None:
    assert _names(tmp_path, ["Qwen3-4B-w8a8-rk3588-4k.rkllm", "Qwen3-4B-w8a8-rk3588-ctx16384.rkllm"]) == [
        "qwen3-4b-ctx16k",
        "qwen3-4b-ctx4k",
    ]


def test_kind_words_keep_models_apart(tmp_path: Path) -> None:
    # An embedding model is not a sibling of its base model: it has its own name.
    assert _names(tmp_path, ["Qwen3-Embedding-0.6B_w8a8.rkllm", "Qwen3-0.6B-w8a8.rkllm"]) == [
        "qwen3-0.6b",
        "qwen3-embedding-0.6b",
    ]


def test_collision_by_index(tmp_path: Path) -> None:
    make_model(tmp_path / "a", "Qwen3-0.6B-rk3588-w8a8.rkllm")
    make_model(tmp_path / "b", "Qwen3-0.6B-rk3588-w8a8.rkllm")
    registry = ModelRegistry([tmp_path / "b", tmp_path / "a"], platform="rk3588")
    infos = {m.name: m.path.parent.name for m in registry.models()}
    assert infos == {"qwen3-0.6b-1": "a", "qwen3-0.6b-2": "b"}
    with pytest.raises(ModelNotFoundError) as caught:
        registry.get("qwen3-0.6b")  # both are for rk3588: still ambiguous
    assert caught.value.suggestions == ("qwen3-0.6b-1", "qwen3-0.6b-2")
    with pytest.raises(ModelNotFoundError, match="ambiguous"):
        registry.get("Qwen3-0.6B-rk3588-w8a8.rkllm")  # the same file name in both


def test_bare_name_is_not_shadowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    make_model(tmp_path, "qwen3_0.6b_w4a16_g64_rk3576.rkllm")
    with caplog.at_level(logging.WARNING, logger="rkllm_core.models.registry"):
        registry = ModelRegistry([tmp_path], platform=None)
        with pytest.raises(ModelNotFoundError) as caught:
            registry.get("qwen3-0.6b")
        registry.refresh(force=True)
        registry.refresh(force=True)
    assert str(caught.value).startswith("model name 'qwen3-0.6b' is ambiguous: it matches qwen3-0.6b-w4a16_g64")
    assert caught.value.suggestions == ("qwen3-0.6b-w4a16_g64", "qwen3-0.6b-w8a8")
    assert registry.get("qwen3-0.6b-w8a8").dtype == "w8a8"
    assert registry.get("QWEN3-0.6B-W4A16_G64").dtype == "w4a16_g64"
    warnings = [r for r in caplog.records if "share the name" in r.getMessage()]
    assert len(warnings) == 1  # once per collision, not once per scan


@pytest.mark.parametrize(("board", "expected"), [("rk3588s", "w8a8"), ("rk3576", "w4a16_g64")])
def test_bare_name_prefers_this_board(tmp_path: Path, board: str, expected: str) -> None:
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    make_model(tmp_path, "qwen3_0.6b_w4a16_g64_rk3576.rkllm")
    registry = ModelRegistry([tmp_path], platform=board)
    assert registry.get("qwen3-0.6b").dtype == expected


def test_platform_is_detected_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_detect(path: str | Path = "") -> str | None:
        calls.append(str(path))
        return "rk3588"

    monkeypatch.setattr(registry_module, "detect_board_platform", fake_detect)
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    registry = ModelRegistry([tmp_path])
    registry.get("qwen3-0.6b")
    assert calls == []  # no collision, no need
    make_model(tmp_path, "Qwen3-0.6B-rk3576-w8a8.rkllm")
    registry.refresh(force=True)
    assert registry.get("qwen3-0.6b").platform == "rk3588"
    assert registry.platform == "rk3588"
    assert len(calls) == 1


# --------------------------------------------------------------------------
# Registry file
# --------------------------------------------------------------------------

REGISTRY_TOML = """
[models."qwen3-0.6b"]
aliases = ["qwen", "small"]
system_prompt = "You are terse."
temperature = 1
top_p = 0.9
top_k = 20
max_new_tokens = 512
chat_template = { system = "<s>", prefix = "U:", postfix = "A:" }

["models"."Gemma-3-1b-it_w8a8.rkllm"]    # by file name, any case
max_context_len = 8192
mirostat = 2
favourite_colour = "blue"
"""


def test_registry_file_defaults_and_aliases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_model(tmp_path, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm")
    make_model(tmp_path, "gemma-3-1b-it_w8a8.rkllm")
    (tmp_path / "rkllm-models.toml").write_text(REGISTRY_TOML)
    with caplog.at_level(logging.WARNING, logger="rkllm_core.models.registry_file"):
        registry = ModelRegistry([tmp_path], platform=None)
        qwen = registry.get("SMALL")
    assert "unknown key 'favourite_colour'" in caplog.text
    assert registry.errors == []
    assert qwen.name == "qwen3-0.6b"
    assert qwen.aliases == ("qwen", "small")
    assert qwen.defaults == ModelDefaults(
        sampling=SamplingParams(temperature=1.0, top_p=0.9, top_k=20),
        max_new_tokens=512,
        system_prompt="You are terse.",
        chat_template=("<s>", "U:", "A:"),
    )
    assert isinstance(qwen.defaults.sampling.temperature, float)
    assert qwen.defaults.sampling.top_k == 20
    assert qwen.context_size == 16384  # the name wins over the registry file
    gemma = registry.get("gemma3-1b")
    assert gemma.defaults.as_dict() == {"max_context_len": 8192, "mirostat": 2}
    assert (gemma.context_size, gemma.context_from_name) == (8192, False)


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("temperature = -0.5", "temperature"),
        ('top_k = "many"', "top_k"),
        ("top_p = 1.5", "top_p"),
        ("mirostat = 3", "mirostat"),
        ("max_context_len = 0", "max_context_len"),
        ("max_new_tokens = true", "max_new_tokens"),
        ("system_prompt = 3", "system_prompt"),
        ("aliases = [1, 2]", "aliases"),
        ('chat_template = { system = "", prefix = "", suffix = "" }', "chat_template"),
    ],
)
def test_registry_file_bad_values(tmp_path: Path, entry: str, key: str) -> None:
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    make_model(tmp_path, "gemma-3-1b-it_w8a8.rkllm")
    toml = tmp_path / "rkllm-models.toml"
    alias = 'aliases = ["q"]\n' if key != "aliases" else ""
    toml.write_text(
        f'[models."qwen3-0.6b"]\n{alias}{entry}\npresence_penalty = 0.5\n\n[models."gemma3-1b"]\ntop_k = 5\n'
    )
    registry = ModelRegistry([tmp_path], platform=None)
    # Only the bad value is left out: the entry's other value and its alias still apply, as does the file.
    assert registry.get("qwen3-0.6b").defaults == ModelDefaults(sampling=SamplingParams(presence_penalty=0.5))
    assert ("q" in registry) == (key != "aliases")
    assert registry.get("gemma3-1b").defaults.sampling.top_k == 5
    [error] = registry.errors
    assert isinstance(error, InvalidParameterError)
    assert str(toml) in str(error) and key in str(error) and "qwen3-0.6b" in str(error)
    with pytest.raises(InvalidParameterError, match=key):
        load_registry_file(toml)


def test_registry_file_not_toml(tmp_path: Path) -> None:
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    toml = tmp_path / "rkllm-models.toml"
    toml.write_text("[models.\nbroken")
    registry = ModelRegistry([tmp_path], platform=None)
    assert registry.get("qwen3-0.6b").defaults == ModelDefaults()
    [error] = registry.errors
    assert str(toml) in str(error)


def test_alias_collisions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w4a16.rkllm")
    make_model(tmp_path, "gemma-3-1b-it_w8a8.rkllm")
    (tmp_path / "rkllm-models.toml").write_text(
        '[models."gemma3-1b"]\naliases = ["qwen3-0.6b-w8a8", "g"]\n\n'
        '[models."qwen3-0.6b-w8a8"]\naliases = ["qwen3-0.6b", "g"]\n'
    )
    with caplog.at_level(logging.WARNING, logger="rkllm_core.models.registry"):
        registry = ModelRegistry([tmp_path], platform=None)
        gemma = registry.get("gemma3-1b")
    assert gemma.aliases == ("g",)
    assert "alias 'qwen3-0.6b-w8a8' for gemma3-1b refused" in caplog.text
    assert "alias 'g' for qwen3-0.6b-w8a8 refused" in caplog.text
    assert registry.get("qwen3-0.6b-w8a8").name == "qwen3-0.6b-w8a8"
    assert registry.get("g").name == "gemma3-1b"
    # An alias may claim a shared friendly name for one of the files sharing it.
    assert registry.get("qwen3-0.6b").name == "qwen3-0.6b-w8a8"


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------


def test_threads_get_and_refresh(tmp_path: Path) -> None:
    files = [
        "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm",
        "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm",
        "gemma-3-1b-it_w8a8.rkllm",
    ]
    for filename in files:
        make_model(tmp_path, filename)
    registry = ModelRegistry([tmp_path], platform=None)
    start = threading.Barrier(8)
    failures: list[BaseException] = []
    seen: list[str] = []

    def worker(index: int) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                for round_ in range(40):
                    seen.append(registry.get(("qwen3-0.6b", "gemma3-270m", "gemma3-1b")[(index + round_) % 3]).name)
                    registry.refresh(force=round_ % 10 == index % 10)
                    if index == 0 and round_ == 20:
                        make_model(tmp_path, "Qwen3-4B-16K.rkllm")
                    assert len(registry.models()) in (3, 4)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        return run

    threads = [threading.Thread(target=worker(i)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures
    assert len(seen) == 8 * 40
    assert set(seen) == {"qwen3-0.6b", "gemma3-270m", "gemma3-1b"}
    assert registry.get("qwen3-4b").context_size == 16384


# --------------------------------------------------------------------------
# Names over the whole corpus
# --------------------------------------------------------------------------

SEED_FILES = (
    "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm",
    "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm",
    "gemma-3-1b-it_w8a8.rkllm",
)
# Words that make a model a different model than its base; each must survive
# into the friendly name (lower case) of every file that has it.
DISTINGUISHING = (
    "coder",
    "math",
    "embedding",
    "reranker",
    "vl",
    "omni",
    "distill",
    "2507",
    "0528",
    "thinking",
    "abliterated",
    "rag",
    "a3b",
    "mesh",
    "mini",
    "128k",
)


def _corpus_files() -> list[str]:
    return [rec["filename"] for rec in _load(LOCAL_DATA)] + list(SEED_FILES)


def _registry_over(tmp_path: Path, files: Sequence[str]) -> ModelRegistry:
    for filename in files:
        make_model(tmp_path, filename)
    return ModelRegistry([tmp_path], platform=None)


def test_seed_files_alone_keep_their_names(tmp_path: Path) -> None:
    assert sorted(m.name for m in _registry_over(tmp_path, SEED_FILES).models()) == [
        "gemma3-1b",
        "gemma3-270m",
        "qwen3-0.6b",
    ]


def test_corpus_names_are_unique_keep_their_words_and_count_only_identical_files(tmp_path: Path) -> None:
    files = [*_corpus_files(), "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm", "Qwen3-30B-A3B-Instruct-2507-w4a16.rkllm"]
    infos = _registry_over(tmp_path, files).models()
    assert len(infos) == len(set(files))
    names = [m.name for m in infos]
    assert len(set(names)) == len(names)
    for info in infos:
        words = set(_tokens(info.filename))
        for word in DISTINGUISHING:
            if word in words:
                assert word in _tokens(info.name), (info.filename, info.name, word)
    by_base: dict[str, list[ModelInfo]] = {}
    for info in infos:
        by_base.setdefault(friendly_name(info.facts), []).append(info)
    for base, members in by_base.items():
        for info in members:
            if re.fullmatch(rf"{re.escape(base)}(-.+)?-\d+", info.name) and len(members) > 1:
                twins = [m for m in members if _separating_values(m.facts) == _separating_values(info.facts)]
                assert len(twins) > 1, f"{info.name}: a counter for a file that differs in a fact"


def _tokens(text: str) -> list[str]:
    """The words of a file or model name (a dot splits only where it is not between digits)."""
    return [t for t in re.split(r"[-_\s]+|(?<!\d)\.|\.(?!\d)", _strip_suffix(text).lower()) if t]


def test_names_do_not_depend_on_unrelated_files(tmp_path: Path) -> None:
    files = _corpus_files()
    full = {m.filename: m.name for m in _registry_over(tmp_path / "all", files).models()}
    qwen3_06 = [f for f in files if friendly_name(parse_model_filename(f)) == "qwen3-0.6b"]
    assert len(qwen3_06) >= 3
    alone = {m.filename: m.name for m in _registry_over(tmp_path / "group", qwen3_06).models()}
    assert alone == {f: full[f] for f in qwen3_06}


def test_adding_a_sibling_keeps_names_that_still_tell_files_apart(tmp_path: Path) -> None:
    first = ["Qwen3-1.7B-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm", "Qwen3-1.7B-rk3588-w4a16.rkllm"]
    before = {m.filename: m.name for m in _registry_over(tmp_path, first).models()}
    assert sorted(before.values()) == ["qwen3-1.7b-w4a16", "qwen3-1.7b-w8a8"]
    make_model(tmp_path, "Qwen3-1.7B-rk3588-w8a8_g128-opt-0-hybrid-ratio-0.5.rkllm")
    after = {m.filename: m.name for m in ModelRegistry([tmp_path], platform=None).models()}
    assert {f: after[f] for f in first} == before
    assert after["Qwen3-1.7B-rk3588-w8a8_g128-opt-0-hybrid-ratio-0.5.rkllm"] == "qwen3-1.7b-w8a8_g128"


def test_suffixes_come_from_facts_not_counters(tmp_path: Path) -> None:
    names = _names(
        tmp_path,
        [
            "Qwen3-8B-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm",
            "Qwen3-8B-rk3588-w8a8-opt-1-hybrid-ratio-0.5.rkllm",
            "Qwen3-4B-1.2.0.rkllm",
            "Qwen3-4B-rk3588-w8a8-rkllm1.1.4.rkllm",
        ],
    )
    assert sorted(names) == ["qwen3-4b-plain", "qwen3-4b-w8a8", "qwen3-8b-opt0", "qwen3-8b-opt1"]
    # Runtime version tags separate files that agree in everything else.
    names = _names(tmp_path / "v", ["Qwen3-4B-w8a8-rk3588-1.2.0.rkllm", "Qwen3-4B-w8a8-rk3588-rkllm1.1.4.rkllm"])
    assert sorted(names) == ["qwen3-4b-rkllm1.1.4", "qwen3-4b-rkllm1.2.0"]


def test_identical_files_get_counters_and_the_warning_says_where_each_lives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_model(tmp_path / "a", "Qwen3-4B-rk3588-w8a8.rkllm")
    make_model(tmp_path / "b", "Qwen3-4B-w8a8-rk3588.rkllm")
    with caplog.at_level("WARNING"):
        infos = ModelRegistry([tmp_path / "a", tmp_path / "b"], platform=None).models()
    assert [(m.name, m.path.parent.name) for m in infos] == [("qwen3-4b-1", "a"), ("qwen3-4b-2", "b")]
    assert str(tmp_path / "a") in caplog.text and str(tmp_path / "b") in caplog.text


def test_a_model_found_by_path_keeps_a_name_that_finds_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model(models, "Qwen_Qwen3-1.7B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
    registry = ModelRegistry([models], platform=None)
    outside = make_model(tmp_path / "elsewhere", "Qwen3-0.6B-w8a8.rkllm")
    same_name = make_model(tmp_path / "other", "Qwen3-1.7B-w4a16.rkllm")
    info = registry.get(str(outside))
    assert registry.get(info.name) == info and registry.get(info.name).path == outside.resolve()
    clash = registry.get(str(same_name))
    assert clash.name == "qwen3-1.7b-2"  # the name in the model directory keeps meaning its own file
    assert registry.get("qwen3-1.7b").path == (models / "Qwen_Qwen3-1.7B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
    assert registry.get("qwen3-1.7b-2").path == same_name.resolve()
    assert registry.get(str(same_name)) == clash  # asked again: the same name
    registry.refresh(force=True)
    assert registry.get(info.name).path == outside.resolve()  # a re-scan keeps it


def test_registry_file_problems_are_logged_once_per_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm")
    toml = tmp_path / "rkllm-models.toml"
    toml.write_text(
        '[models."qwen3-0.6b"]\naliases = ["q"]\ntemperature = -1\nfavourite = 1\n[models."nope"]\ntop_k = 2\n'
    )
    with caplog.at_level(logging.WARNING, logger="rkllm_core.models"):
        registry = ModelRegistry([tmp_path], platform=None)
        assert registry.get("q").name == "qwen3-0.6b"  # the bad value alone is ignored: the alias applies
        for _ in range(3):
            registry.refresh(force=True)
        assert registry.errors and registry.get("q").name == "qwen3-0.6b"
        said = [r.getMessage() for r in caplog.records]
        assert sum("temperature" in m for m in said) == 1
        assert sum("favourite" in m for m in said) == 1
        assert sum("matches no model file" in m for m in said) == 1
        caplog.clear()
        toml.write_text('[models."qwen3-0.6b"]\naliases = ["q"]\ntemperature = -2\n')
        registry.refresh(force=True)
        registry.refresh(force=True)
    said = [r.getMessage() for r in caplog.records]
    assert sum("temperature=-2" in m for m in said) == 1 and not any("favourite" in m for m in said)
