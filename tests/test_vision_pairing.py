"""Image encoders paired with language models by the registry: file names, the folder, the registry file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rkllm_core.models.pairing import input_size_in_name
from rkllm_core.models.registry import ModelRegistry


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x" * (len(name) + 1))


def registry(root: Path) -> ModelRegistry:
    return ModelRegistry([root], platform=None)


def encoder_of(reg: ModelRegistry, filename: str) -> str | None:
    info = next(i for i in reg.models() if i.filename == filename)
    return info.encoder.name if info.encoder is not None else None


ZOO = [
    ("qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl-2b_vision_rk3588.rknn", "qwen3-vl"),
    ("qwen2.5-vl-3b-w8a8_level1_rk3588.rkllm", "qwen2_5_vl_3b_vision_rk3588.rknn", "qwen2.5-vl"),
    ("internvl3-1b_w8a8_rk3588.rkllm", "internvl3-1b_vision_fp16_rk3588.rknn", "internvl3"),
]


@pytest.mark.parametrize(("model", "encoder", "family"), ZOO)
def test_the_zoo_pairs_are_paired_by_their_model_words(tmp_path: Path, model: str, encoder: str, family: str) -> None:
    touch(tmp_path / "vl", model, encoder)
    info = registry(tmp_path).models()[0]
    assert info.encoder == (tmp_path / "vl" / encoder).resolve()
    assert info.encoder_size == len(encoder) + 1
    assert (info.kind, info.vision_family, info.text_only) == ("vision", family, False)


def test_one_folder_with_every_zoo_pair_pairs_each_model_with_its_own_encoder(tmp_path: Path) -> None:
    touch(tmp_path / "vl", *[name for pair in ZOO for name in pair[:2]])
    reg = registry(tmp_path)
    assert {i.filename: encoder_of(reg, i.filename) for i in reg.models()} == {m: e for m, e, _ in ZOO}


def test_the_only_pair_in_a_folder_is_paired_when_the_names_say_nothing(tmp_path: Path) -> None:
    touch(tmp_path / "qwen25vl", "language_model_w8a8.rkllm", "vision_encoder.rknn")
    info = registry(tmp_path).models()[0]
    assert info.encoder is not None and info.encoder.name == "vision_encoder.rknn"
    assert info.kind == "vision"


def test_nameless_files_are_not_paired_when_the_folder_holds_more_than_one_model(tmp_path: Path) -> None:
    touch(tmp_path / "mixed", "language_model_w8a8.rkllm", "other_model_w8a8.rkllm", "vision_encoder.rknn")
    assert [i.encoder for i in registry(tmp_path).models()] == [None, None]


def test_several_encoders_for_one_model_the_smallest_input_size_is_taken(tmp_path: Path) -> None:
    sizes = ("896", "448", "672")
    touch(
        tmp_path / "gk",
        "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm",
        *[f"qwen3-vl-2b_vision_{s}_rk3588.rknn" for s in sizes],
    )
    assert (
        encoder_of(registry(tmp_path), "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm") == "qwen3-vl-2b_vision_448_rk3588.rknn"
    )


def test_an_encoder_without_a_size_in_its_name_is_the_default_among_several(tmp_path: Path) -> None:
    names = ("qwen3-vl-2b_vision_672_rk3588.rknn", "qwen3-vl-2b_vision_rk3588.rknn")
    touch(tmp_path / "gk", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", *names)
    assert encoder_of(registry(tmp_path), "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm") == names[1]


def test_input_sizes_are_read_only_from_words_of_their_own() -> None:
    assert input_size_in_name("qwen3-vl-2b_vision_896_rk3588.rknn") == 896
    assert input_size_in_name("qwen3-vl-2b_vision_rk3588.rknn") is None
    assert input_size_in_name("internvl3-1b_vision_fp16_rk3588.rknn") is None


def test_text_models_never_get_an_encoder(tmp_path: Path) -> None:
    touch(tmp_path / "qwen3", "Qwen3-0.6B-w8a8-rk3588.rkllm", "qwen3-vl-2b_vision_rk3588.rknn")
    touch(tmp_path / "both", "Qwen3-1.7B-w8a8-rk3588.rkllm", "vision_encoder.rknn")
    reg = registry(tmp_path)
    assert [(i.kind, i.encoder, i.vision_family) for i in reg.models()] == [("chat", None, None)] * 2


def test_an_encoder_for_another_size_or_soc_is_not_paired(tmp_path: Path) -> None:
    touch(tmp_path / "a", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl-4b_vision_rk3588.rknn", "x.rkllm")
    touch(tmp_path / "b", "qwen3-vl-2b-instruct_w4a16_g128_rk3576.rkllm", "qwen3-vl-2b_vision_rk3588.rknn")
    reg = registry(tmp_path)
    assert encoder_of(reg, "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm") is None
    assert encoder_of(reg, "qwen3-vl-2b-instruct_w4a16_g128_rk3576.rkllm") is None


def test_a_vision_model_without_an_encoder_serves_text_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    touch(tmp_path / "vl", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm")
    reg = registry(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rkllm_core.models.registry"):
        info = reg.models()[0]
        reg.refresh(force=True)
        reg.refresh(force=True)
    assert (info.kind, info.encoder, info.text_only, info.vision_family) == ("vision", None, True, "qwen3-vl")
    said = [r.getMessage() for r in caplog.records if "serves text only" in r.getMessage()]
    assert len(said) == 1 and info.name in said[0]


def test_an_encoder_dropped_in_later_is_paired_at_the_next_lookup(tmp_path: Path) -> None:
    touch(tmp_path / "vl", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm")
    reg = registry(tmp_path)
    assert reg.models()[0].encoder is None
    touch(tmp_path / "vl", "qwen3-vl-2b_vision_rk3588.rknn")
    reg.refresh(force=True)
    assert reg.get("qwen3-vl-2b").encoder is not None


def write_registry(root: Path, text: str) -> None:
    (root / "rkllm-models.toml").write_text(text, encoding="utf-8")


def test_the_registry_file_names_the_encoder_relative_to_its_own_folder(tmp_path: Path) -> None:
    names = ("qwen3-vl-2b_vision_448_rk3588.rknn", "qwen3-vl-2b_vision_896_rk3588.rknn")
    touch(tmp_path / "gk", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", *names)
    write_registry(tmp_path, f'[models."qwen3-vl-2b"]\nvision_encoder = "gk/{names[1]}"\n')
    reg = registry(tmp_path)
    assert reg.errors == []
    assert encoder_of(reg, "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm") == names[1]


def test_the_registry_file_pairs_a_model_no_rule_would(tmp_path: Path) -> None:
    touch(tmp_path / "m", "language_model_w8a8.rkllm", "other_w8a8.rkllm")
    touch(tmp_path / "enc", "vit.rknn")
    write_registry(tmp_path, '[models."language_model_w8a8"]\nvision_encoder = "enc/vit.rknn"\n')
    reg = registry(tmp_path)
    assert encoder_of(reg, "language_model_w8a8.rkllm") == "vit.rknn"
    assert encoder_of(reg, "other_w8a8.rkllm") is None
    assert reg.get("language_model_w8a8").kind == "vision"


def test_a_missing_encoder_named_by_the_registry_file_is_an_error_and_kept(tmp_path: Path) -> None:
    touch(tmp_path / "vl", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm")
    write_registry(tmp_path, '[models."qwen3-vl-2b"]\nvision_encoder = "vl/gone.rknn"\n')
    reg = registry(tmp_path)
    assert [e for e in reg.errors if "gone.rknn" in str(e)]
    info = reg.get("qwen3-vl-2b")
    assert info.encoder == tmp_path / "vl" / "gone.rknn" and info.encoder_size == 0


def test_a_text_kind_in_the_registry_file_keeps_the_encoder_away(tmp_path: Path) -> None:
    touch(tmp_path / "vl", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl-2b_vision_rk3588.rknn")
    write_registry(tmp_path, '[models."qwen3-vl-2b"]\nkind = "chat"\n')
    info = registry(tmp_path).get("qwen3-vl-2b")
    assert (info.kind, info.encoder) == ("chat", None)


def test_the_vision_table_sets_the_family_and_its_overrides(tmp_path: Path) -> None:
    touch(tmp_path / "m", "language_model_w8a8.rkllm", "vision_encoder.rknn")
    write_registry(tmp_path, '[models."language_model_w8a8"]\nvision = { family = "Qwen2.5-VL", fill = [0, 0, 0] }\n')
    reg = registry(tmp_path)
    info = reg.get("language_model_w8a8")
    assert reg.errors == []
    assert info.vision_family == "qwen2.5-vl"
    assert info.defaults.vision_overrides == {"fill": (0, 0, 0)}


def test_an_unknown_vision_family_is_an_error_and_the_rest_of_the_entry_applies(tmp_path: Path) -> None:
    touch(tmp_path / "m", "language_model_w8a8.rkllm", "vision_encoder.rknn")
    write_registry(
        tmp_path,
        '[models."language_model_w8a8"]\naliases = ["vl"]\ntemperature = 0.3\nvision = { family = "nosuchvl" }\n',
    )
    reg = registry(tmp_path)
    assert len(reg.errors) == 1 and "nosuchvl" in str(reg.errors[0])
    info = reg.get("vl")
    assert info.defaults.sampling.temperature == 0.3
    assert info.defaults.vision is None and info.vision_family is None


def test_an_unknown_family_with_every_fact_given_is_accepted(tmp_path: Path) -> None:
    touch(tmp_path / "m", "language_model_w8a8.rkllm", "vision_encoder.rknn")
    facts = (
        'family = "newvl", image_size = 336, tokens_per_image = 144, embed_width = 1024, '
        'img_start = "<s>", img_end = "</s>", img_content = "<p>"'
    )
    write_registry(tmp_path, f'[models."language_model_w8a8"]\nvision = {{ {facts} }}\n')
    reg = registry(tmp_path)
    assert reg.errors == []
    assert reg.get("language_model_w8a8").vision_family == "newvl"


def test_a_bad_vision_override_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "vl", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl-2b_vision_rk3588.rknn")
    write_registry(tmp_path, '[models."qwen3-vl-2b"]\nvision = { colour = 3 }\n')
    reg = registry(tmp_path)
    assert len(reg.errors) == 1 and "colour" in str(reg.errors[0])
    assert reg.get("qwen3-vl-2b").vision_family == "qwen3-vl"


def test_a_model_looked_up_by_a_path_outside_the_directories_is_paired_too(tmp_path: Path) -> None:
    touch(tmp_path / "elsewhere", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl-2b_vision_rk3588.rknn")
    (tmp_path / "models").mkdir()
    info = registry(tmp_path / "models").get(str(tmp_path / "elsewhere" / "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm"))
    assert info.encoder is not None and info.encoder.name == "qwen3-vl-2b_vision_rk3588.rknn"


def test_rkllm_models_shows_the_encoder_column_only_when_a_model_has_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rkllm_core.tools.cli import main

    touch(tmp_path / "text", "Qwen3-0.6B-w8a8-rk3588.rkllm")
    assert main(["models", "--model-dir", str(tmp_path)]) == 0
    assert "ENCODER" not in capsys.readouterr().out
    touch(tmp_path / "vl", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl-2b_vision_rk3588.rknn")
    assert main(["models", "--model-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "ENCODER"
    vl = next(line for line in lines if line.startswith("qwen3-vl-2b"))
    assert vl.split()[1] == "vision" and vl.split()[-1] == "qwen3-vl-2b_vision_rk3588.rknn"


def test_rkllm_models_json_always_has_the_encoder_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from rkllm_core.tools.cli import main

    touch(tmp_path / "text", "Qwen3-0.6B-w8a8-rk3588.rkllm")
    touch(tmp_path / "vl", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl-2b_vision_rk3588.rknn")
    assert main(["models", "--json", "--model-dir", str(tmp_path)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["qwen3-0.6b"]["encoder"] is None
    assert rows["qwen3-vl-2b"]["encoder"] == str((tmp_path / "vl" / "qwen3-vl-2b_vision_rk3588.rknn").resolve())
