"""rkllm pull without a Hub: the reference forms, the choice of files, the manifest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rkllm_core.errors import AmbiguousModelFileError, InvalidParameterError, PullError
from rkllm_core.hub.manifest import Manifest, ManifestFile, read_manifest, source_of, write_manifest
from rkllm_core.hub.refs import HubRef, parse_ref
from rkllm_core.hub.select import choose_companions, choose_model_file, file_platform, library_abi
from rkllm_core.sim import make_model


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("acme/repo/Qwen3-0.6B.rkllm", HubRef("acme/repo", "Qwen3-0.6B.rkllm")),
        ("acme/repo/rk3588/Qwen3-0.6B.rkllm", HubRef("acme/repo", "rk3588/Qwen3-0.6B.rkllm")),
        ("hf.co/acme/repo", HubRef("acme/repo")),
        ("hf.co/acme/repo/Qwen3-0.6B.rkllm", HubRef("acme/repo", "Qwen3-0.6B.rkllm")),
        ("huggingface.co/acme/repo:w8a8", HubRef("acme/repo", tag="w8a8")),
        ("https://huggingface.co/acme/repo", HubRef("acme/repo")),
        ("https://huggingface.co/acme/repo/blob/v2/a.rkllm", HubRef("acme/repo", "a.rkllm", revision="v2")),
        ("hf.co/acme/repo:latest", HubRef("acme/repo")),
        ("acme/repo:RK3576", HubRef("acme/repo", tag="RK3576")),
        ("acme/repo", HubRef("acme/repo")),
    ],
)
def test_reference_forms(ref: str, expected: HubRef) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "qwen3", "acme/", "/repo", "acme/re po", "acme/repo/../x.rkllm", "acme/.hidden"])
def test_bad_references_are_refused(ref: str) -> None:
    with pytest.raises(InvalidParameterError, match="OWNER/REPO"):
        parse_ref(ref)


def test_file_and_revision_given_apart_win() -> None:
    assert parse_ref("acme/repo/a.rkllm", filename="b.rkllm", revision="dev") == HubRef(
        "acme/repo", "b.rkllm", revision="dev"
    )


PATHS = [
    "README.md",
    "tokenizer.json",
    "rk3588/Qwen3-4B-w8a8-rk3588.rkllm",
    "rk3588/tokenizer.json",
    "rk3576/Qwen3-4B-w4a16-rk3576.rkllm",
    "Qwen3-4B-w8a8_g128.rkllm",
]


def test_a_named_file_is_taken_as_named_even_for_another_board() -> None:
    chosen = choose_model_file(HubRef("a/b", "Qwen3-4B-w4a16-rk3576.rkllm"), PATHS, board="rk3588", abi=None)
    assert chosen == "rk3576/Qwen3-4B-w4a16-rk3576.rkllm"


def test_a_named_file_that_is_not_a_model_is_refused() -> None:
    with pytest.raises(PullError, match="not a .rkllm"):
        choose_model_file(HubRef("a/b", "README.md"), PATHS, board=None, abi=None)


def test_the_board_picks_its_platform_and_a_folder_named_after_the_soc_counts() -> None:
    assert file_platform("rk3576/model.rkllm") == "rk3576"
    assert choose_model_file(HubRef("a/b"), PATHS, board="rk3576", abi=None) == "rk3576/Qwen3-4B-w4a16-rk3576.rkllm"


def test_a_file_without_a_platform_and_one_for_the_board_still_leave_a_choice() -> None:
    with pytest.raises(AmbiguousModelFileError) as caught:
        choose_model_file(HubRef("a/b"), [*PATHS, "rk3588/Qwen3-4B-w4a16-rk3588.rkllm"], board="rk3588s", abi=None)
    assert caught.value.files == ("rk3588/Qwen3-4B-w4a16-rk3588.rkllm", "rk3588/Qwen3-4B-w8a8-rk3588.rkllm")
    assert "rkllm pull a/b/rk3588/Qwen3-4B-w8a8-rk3588.rkllm" in str(caught.value)


def test_a_tag_that_matches_nothing_lists_the_files() -> None:
    with pytest.raises(PullError, match="matches 'w4a8'") as caught:
        choose_model_file(HubRef("a/b", tag="w4a8"), PATHS, board=None, abi=None)
    assert "rk3588/Qwen3-4B-w8a8-rk3588.rkllm" in str(caught.value)


def test_companions_beside_the_model_win_over_the_roots() -> None:
    chosen = choose_companions("rk3588/Qwen3-4B-w8a8-rk3588.rkllm", PATHS, board=None)
    assert chosen == ["rk3588/tokenizer.json", "README.md"]


def test_library_abi_reads_the_simulator_without_loading_it(
    sim_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for abi, path in sim_paths.items():
        monkeypatch.setenv("RKLLM_LIB_PATH", str(path))
        assert library_abi() == abi
    monkeypatch.setenv("RKLLM_LIB_PATH", str(sim_paths["1.3"].parent / "missing.so"))
    assert library_abi() is None


def test_manifest_round_trip_and_source(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", "Qwen3-0.6B-w8a8-rk3588.rkllm")
    manifest = Manifest(
        repo_id="acme/repo",
        revision="main",
        commit="0123456789abcdef0123456789abcdef01234567",
        endpoint="https://huggingface.co",
        model=model.name,
        files=(ManifestFile(model.name, model.name, model.stat().st_size, sha256="ab" * 32),),
        pulled_at="2026-12-06T20:00:00+00:00",
    )
    assert source_of(model) is None
    write_manifest(model.parent, manifest)
    assert read_manifest(model.parent) == manifest
    assert source_of(model) == "hf.co/acme/repo@01234567"
    assert source_of(make_model(tmp_path / "m", "other.rkllm")) is None
    assert sorted(p.name for p in model.parent.iterdir()) == [".rkllm-pull.json", model.name, "other.rkllm"]


def test_source_of_needs_no_huggingface_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert source_of(tmp_path / "x.rkllm") is None
