"""rkllm pull / rkllm rm against a local fake Hub (tests/fakehub.py): never the network.

``huggingface_hub`` reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when first imported, so
the end-to-end cases run the CLI in a subprocess with those set; the in-process cases pass
``endpoint=`` and monkeypatch ``huggingface_hub.constants`` (offline off, telemetry off so no
request leaves for the real Hub).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core.board import detect_board_platform
from rkllm_core.errors import AmbiguousModelFileError, ChecksumError, PullError
from rkllm_core.hub import download as download_module
from rkllm_core.hub.download import PullProgress, pull
from rkllm_core.hub.manifest import MANIFEST_NAME, read_manifest, source_of
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.sim import make_model

from .fakehub import Cut, FakeHub, serve

pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[1]
REPO = "acme/Qwen3-0.6B-rkllm"
MODEL = "Qwen3-0.6B-w8a8-rk3588.rkllm"


def model_bytes(tmp_path: Path, filename: str = MODEL) -> bytes:
    return make_model(tmp_path / "made", filename).read_bytes()


def chat_repo(tmp_path: Path) -> dict[str, bytes]:
    return {
        MODEL: model_bytes(tmp_path),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}',
        "README.md": b"# Qwen3 0.6B for RK3588\n",
        "config.json": b"{}",
    }


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serve() as fake:
        yield fake


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process pulls: online whatever the caller's environment says, and no telemetry request."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


def cli_env(tmp_path: Path, endpoint: str, models: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RKLLM_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        RKLLM_MODEL_DIR=str(models),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def visible_models(models: Path) -> list[Path]:
    return [p for p in models.rglob("*") if p.suffix.lower() == ".rkllm"]


# -- end to end, through the CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [f"{REPO}/{MODEL}", f"hf.co/{REPO}", f"https://huggingface.co/{REPO}/blob/main/{MODEL}", REPO, f"{REPO}:W8A8"],
)
def test_pull_each_reference_form(tmp_path: Path, hub: FakeHub, models: Path, ref: str) -> None:
    files = chat_repo(tmp_path)
    hub.add(REPO, files)
    result = run_cli(cli_env(tmp_path, hub.url, models), "pull", ref, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = models / MODEL.removesuffix(".rkllm")
    assert (folder / MODEL).read_bytes() == files[MODEL]
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (folder / name).read_bytes() == files[name]
    assert not (folder / "config.json").exists()
    assert sorted(p.name for p in models.iterdir()) == [f".{folder.name}.lock", folder.name]  # no staging left
    assert "qwen3-0.6b" in result.stdout and "pulled 4 file(s)" in result.stdout
    assert source_of(folder / MODEL) == f"{hub.url.split('://')[1]}/{REPO}@{hub.repos[REPO].commit[:8]}"


def test_rkllm_models_says_where_a_pulled_model_came_from(tmp_path: Path, hub: FakeHub, models: Path) -> None:
    hub.add(REPO, chat_repo(tmp_path))
    env = cli_env(tmp_path, hub.url, models)
    make_model(models, "gemma-3-1b-it_w8a8.rkllm")  # put there by hand: no source
    assert "SOURCE" not in run_cli(env, "models", cwd=tmp_path).stdout
    assert run_cli(env, "pull", REPO, cwd=tmp_path).returncode == 0
    table = run_cli(env, "models", cwd=tmp_path).stdout.splitlines()
    source = f"{hub.url.split('://')[1]}/{REPO}@{hub.repos[REPO].commit[:8]}"
    assert "SOURCE" in table[0]
    assert [line.split()[-1] for line in table if line.startswith("qwen3-0.6b")] == [source]
    rows = {row["name"]: row for row in json.loads(run_cli(env, "models", "--json", cwd=tmp_path).stdout)}
    assert rows["qwen3-0.6b"]["source"] == source and rows["gemma3-1b"]["source"] is None


def test_checksum_mismatch_installs_nothing(tmp_path: Path, hub: FakeHub, models: Path) -> None:
    files = chat_repo(tmp_path)
    repo = hub.add(REPO, files)
    corrupt = bytearray(files[MODEL])
    corrupt[-1] ^= 0xFF
    repo.served[MODEL] = bytes(corrupt)
    result = run_cli(cli_env(tmp_path, hub.url, models), "pull", f"{REPO}/{MODEL}", cwd=tmp_path)
    assert result.returncode == 2
    assert "rkllm: error:" in result.stderr and "sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert visible_models(models) == []
    assert not any(p.name.endswith(".partial") for p in models.iterdir())


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("acme/no-such-repo", "no repository acme/no-such-repo"),
        ("not a reference", "cannot read 'not a reference'"),
        (f"{REPO}/missing.rkllm", "has no file 'missing.rkllm'"),
        ("acme/readme-only", "holds no .rkllm file"),
        ("closed-port", "cannot reach"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, hub: FakeHub, models: Path, ref: str, expected: str) -> None:
    hub.add(REPO, chat_repo(tmp_path))
    hub.add("acme/readme-only", {"README.md": b"nothing here"})
    endpoint = hub.url
    if ref == "closed-port":
        ref, endpoint = REPO, _closed_port_url()
    result = run_cli(cli_env(tmp_path, endpoint, models), "pull", ref, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "rkllm: error:" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["HF_TOKEN", "HF_HOME"])
def test_a_private_repository_needs_the_token(tmp_path: Path, hub: FakeHub, models: Path, where: str) -> None:
    hub.add(REPO, chat_repo(tmp_path), token="hf_secret")
    env = cli_env(tmp_path, hub.url, models)
    refused = run_cli(env, "pull", REPO, cwd=tmp_path)
    assert refused.returncode == 2 and "HF_TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    if where == "HF_TOKEN":
        env["HF_TOKEN"] = "hf_secret"
    else:  # the token `hf auth login` saves under HF_HOME
        Path(env["HF_HOME"]).mkdir(parents=True)
        (Path(env["HF_HOME"]) / "token").write_text("hf_secret")
    result = run_cli(env, "pull", REPO, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (models / MODEL.removesuffix(".rkllm") / MODEL).is_file()


def test_offline_mode(tmp_path: Path, hub: FakeHub, models: Path, online: None) -> None:
    hub.add(REPO, chat_repo(tmp_path))
    env = cli_env(tmp_path, hub.url, models, HF_HUB_OFFLINE="1")
    before = run_cli(env, "pull", REPO, cwd=tmp_path)
    assert before.returncode == 2 and "offline" in before.stderr and "Traceback" not in before.stderr
    pull(REPO, models, endpoint=hub.url, platform=None)
    requests = len(hub.requests)
    after = run_cli(env, "pull", REPO, cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert "present (offline mode" in after.stdout
    assert len(hub.requests) == requests  # offline: the Hub was not asked


def test_rm_removes_a_pulled_model_and_refuses_others(tmp_path: Path, hub: FakeHub, models: Path,
                                                      online: None) -> None:  # fmt: skip
    hub.add(REPO, chat_repo(tmp_path))
    result = pull(REPO, models, endpoint=hub.url, platform=None)
    own = make_model(models, "gemma-3-1b-it_w8a8.rkllm")
    env = cli_env(tmp_path, hub.url, models)
    refused = run_cli(env, "rm", "gemma3-1b", cwd=tmp_path)
    assert refused.returncode == 2 and "was not pulled" in refused.stderr and str(own) in refused.stderr
    assert own.exists()
    removed = run_cli(env, "rm", "qwen3-0.6b", cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert not result.model_path.parent.exists() and own.exists()
    unknown = run_cli(env, "rm", "qwen3-0.6b", cwd=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_ctrl_c_keeps_the_partial_download_hidden_and_the_next_pull_resumes(
    tmp_path: Path, hub: FakeHub, models: Path
) -> None:
    import huggingface_hub.constants as constants

    chunk = constants.DOWNLOAD_CHUNK_SIZE  # huggingface_hub writes what it receives in chunks of this size
    files = chat_repo(tmp_path)
    files[MODEL] = files[MODEL] + bytes(range(256)) * (chunk // 128)
    hub.add(REPO, files)
    half = chunk
    hold = threading.Event()
    hub.cuts[MODEL] = Cut(after=chunk + 5000, refuse=False, hold=hold)  # one whole chunk reaches the disk
    env = cli_env(tmp_path, hub.url, models)
    part = models / f".{MODEL.removesuffix('.rkllm')}.partial" / f"{MODEL}.part"
    proc = subprocess.Popen([sys.executable, "-m", "rkllm_core.tools", "pull", f"{REPO}/{MODEL}"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (part.exists() and part.stat().st_size == half):  # wait until the first half is on disk
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        hold.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    assert visible_models(models) == []  # the partial file is hidden, and not a .rkllm
    assert part.stat().st_size == half
    again = run_cli(env, "pull", f"{REPO}/{MODEL}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    last = hub.file_gets(MODEL)[-1]
    assert last.headers.get("range") == f"bytes={half}-"
    assert last.sent == len(files[MODEL]) - half
    assert (models / MODEL.removesuffix(".rkllm") / MODEL).read_bytes() == files[MODEL]


# -- in process ---------------------------------------------------------------------------------------------


def test_interrupted_transfer_resumes_with_a_range_request(
    tmp_path: Path, hub: FakeHub, models: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as constants

    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB): small ones here
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1000)
    files = chat_repo(tmp_path)
    files[MODEL] = files[MODEL] + bytes(range(256)) * 64
    hub.add(REPO, files)
    cut = hub.cuts[MODEL] = Cut(after=5000)
    with pytest.raises(PullError, match="resume"):
        pull(f"{REPO}/{MODEL}", models, endpoint=hub.url, platform=None)
    assert all(p.parent.name.startswith(".") for p in visible_models(models))  # only the hidden staging
    cut.refuse = False
    result = pull(f"{REPO}/{MODEL}", models, endpoint=hub.url, platform=None)
    gets = hub.file_gets(MODEL)
    assert gets[0].sent == 5000 and "range" not in gets[0].headers
    assert gets[-1].headers["range"] == "bytes=5000-" and gets[-1].sent == len(files[MODEL]) - 5000
    assert any(r.status == 302 and r.headers.get("range") == "bytes=5000-" for r in hub.requests)  # via storage
    assert hashlib.sha256(result.model_path.read_bytes()).hexdigest() == hashlib.sha256(files[MODEL]).hexdigest()


def test_repeated_pull_downloads_nothing(tmp_path: Path, hub: FakeHub, models: Path, online: None) -> None:
    hub.add(REPO, chat_repo(tmp_path))
    first = pull(REPO, models, endpoint=hub.url, platform=None)
    gets = len(hub.file_gets())
    assert gets == 4 and not first.up_to_date
    steps: list[PullProgress] = []
    second = pull(REPO, models, endpoint=hub.url, platform=None, on_progress=steps.append)
    assert len(hub.file_gets()) == gets
    assert second.up_to_date and second.downloaded == ()
    assert steps[-1].status == "up to date"


def test_a_changed_file_is_pulled_again(tmp_path: Path, hub: FakeHub, models: Path, online: None) -> None:
    repo = hub.add(REPO, chat_repo(tmp_path))
    pull(REPO, models, endpoint=hub.url, platform=None)
    repo.files["README.md"] = b"# updated\n"
    repo.commit = "fedcba9876543210fedcba9876543210fedcba98"
    result = pull(REPO, models, endpoint=hub.url, platform=None)
    assert result.downloaded == ("README.md",)
    assert (result.model_path.parent / "README.md").read_bytes() == b"# updated\n"
    manifest = read_manifest(result.model_path.parent)
    assert manifest is not None and manifest.commit == repo.commit


def fake_board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compatible: bytes | None) -> None:
    """Make the pull read this board's SoC from a device-tree file under tmp_path."""
    path = tmp_path / "compatible"
    if compatible is not None:
        path.write_bytes(compatible)
    monkeypatch.setattr(download_module, "detect_board_platform", lambda: detect_board_platform(path))


PLATFORM_FILES = ["rk3588/Qwen3-1.7B-w8a8-rk3588.rkllm", "rk3576/Qwen3-1.7B-w8a8-rk3576.rkllm"]


@pytest.mark.parametrize("board", [b"radxa,rock-4d\0rockchip,rk3576\0", b"radxa,rock-5b\0rockchip,rk3588\0"])
def test_several_platform_files_pick_this_boards(tmp_path: Path, hub: FakeHub, models: Path, online: None,
                                                 monkeypatch: pytest.MonkeyPatch, board: bytes) -> None:  # fmt: skip
    hub.add(REPO, {p: model_bytes(tmp_path, p.split("/")[1]) for p in PLATFORM_FILES})
    fake_board(tmp_path, monkeypatch, board)
    result = pull(REPO, models, endpoint=hub.url)
    soc = board.split(b"rockchip,")[1].strip(b"\0").decode()
    assert result.model_path.name == f"Qwen3-1.7B-w8a8-{soc}.rkllm"
    assert [r.path.rsplit("/", 1)[-1] for r in hub.file_gets()] == [result.model_path.name]


def test_several_platform_files_without_a_board_refuse_with_the_commands(
    tmp_path: Path, hub: FakeHub, models: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add(REPO, {p: model_bytes(tmp_path, p.split("/")[1]) for p in PLATFORM_FILES})
    fake_board(tmp_path, monkeypatch, None)
    with pytest.raises(AmbiguousModelFileError) as caught:
        pull(REPO, models, endpoint=hub.url)
    for path in PLATFORM_FILES:
        assert f"rkllm pull {REPO}/{path}" in str(caught.value)
    assert caught.value.files == tuple(sorted(PLATFORM_FILES))
    assert hub.file_gets() == [] and not models.exists() or visible_models(models) == []
    chosen = pull(f"{REPO}:RK3576", models, endpoint=hub.url)
    assert chosen.model_path.name == "Qwen3-1.7B-w8a8-rk3576.rkllm"


def test_a_board_with_no_matching_file_refuses(tmp_path: Path, hub: FakeHub, models: Path, online: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    hub.add(REPO, {p: model_bytes(tmp_path, p.split("/")[1]) for p in PLATFORM_FILES})
    fake_board(tmp_path, monkeypatch, b"rockchip,rk3566\0")
    with pytest.raises(AmbiguousModelFileError, match="none is built for this board's rk3566"):
        pull(REPO, models, endpoint=hub.url)


def test_runtime_version_in_the_name_picks_the_librarys_abi(tmp_path: Path, hub: FakeHub, models: Path,
                                                            online: None, monkeypatch: pytest.MonkeyPatch,
                                                            sim_paths: dict[str, Path]) -> None:  # fmt: skip
    names = ["Qwen3-1.7B-w8a8-rk3588-1.2.3.rkllm", "Qwen3-1.7B-w8a8-rk3588-1.3.0.rkllm"]
    hub.add(REPO, {n: model_bytes(tmp_path, n) for n in names})
    fake_board(tmp_path, monkeypatch, b"rockchip,rk3588\0")
    for abi, name in (("1.2", names[0]), ("1.3", names[1])):
        monkeypatch.setenv("RKLLM_LIB_PATH", str(sim_paths[abi]))
        assert pull(REPO, tmp_path / f"models-{abi}", endpoint=hub.url).model_path.name == name


def test_vision_repository_brings_its_encoder(tmp_path: Path, hub: FakeHub, models: Path, online: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    vl = "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm"
    files = {
        vl: model_bytes(tmp_path, vl),
        "qwen2.5-vl-3b_vision_rk3588.rknn": b"RKNN encoder for rk3588",
        "qwen2.5-vl-3b_vision_rk3576.rknn": b"RKNN encoder for rk3576",
        "LICENSE": b"Apache-2.0",
    }
    hub.add("acme/Qwen2.5-VL-3B-rkllm", files)
    fake_board(tmp_path, monkeypatch, b"rockchip,rk3588s\0")
    result = pull("hf.co/acme/Qwen2.5-VL-3B-rkllm", models, endpoint=hub.url)
    assert sorted(p.name for p in result.files) == sorted([vl, "qwen2.5-vl-3b_vision_rk3588.rknn", "LICENSE"])
    assert (result.model_path.parent / "qwen2.5-vl-3b_vision_rk3588.rknn").read_bytes() == b"RKNN encoder for rk3588"
    assert ModelRegistry([models]).get("qwen2.5-vl-3b").kind == "vision"


def test_pulled_model_is_registered_and_loads_on_the_simulator(
    tmp_path: Path, hub: FakeHub, online: None, runtime_factory: Callable[..., RKLLMRuntime]
) -> None:
    models = tmp_path / "pulled"  # conftest's model_dir is tmp_path / "models"
    hub.add(REPO, chat_repo(tmp_path))
    result = pull(REPO, models, endpoint=hub.url, platform=None)
    info = ModelRegistry([models]).get("qwen3-0.6b")
    assert info.path == result.model_path.resolve()
    runtime = runtime_factory(info.path)
    assert runtime is not None
    assert (result.model_path.parent / MANIFEST_NAME).is_file()


def test_embedding_tokenizer_lands_where_the_engine_finds_it(tmp_path: Path, hub: FakeHub, models: Path,
                                                              online: None) -> None:  # fmt: skip
    from rkllm_core.embed.engine import tokenizer_path

    name = "Qwen3-Embedding-0.6B-w8a8-rk3588.rkllm"
    hub.add("acme/Qwen3-Embedding-0.6B-rkllm", {name: model_bytes(tmp_path, name), "tokenizer.json": b"{}"})
    result = pull("acme/Qwen3-Embedding-0.6B-rkllm", models, endpoint=hub.url, platform=None)
    info = ModelRegistry([models]).get("qwen3-embedding-0.6b")
    assert tokenizer_path(info) == result.model_path.parent / "tokenizer.json"


def test_checksum_error_in_process_removes_the_staging(tmp_path: Path, hub: FakeHub, models: Path,
                                                       online: None) -> None:  # fmt: skip
    files = chat_repo(tmp_path)
    repo = hub.add(REPO, files)
    repo.served["tokenizer.json"] = files["tokenizer.json"].replace(b"BPE", b"XYZ")
    with pytest.raises(ChecksumError) as caught:
        pull(REPO, models, endpoint=hub.url, platform=None)
    assert caught.value.filename == "tokenizer.json"
    assert [p.name for p in models.iterdir()] == [f".{MODEL.removesuffix('.rkllm')}.lock"]


def test_missing_huggingface_hub_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(PullError, match=r'pip install -e "\.\[hub\]"'):
        pull(REPO, tmp_path)


def test_a_second_pull_of_the_same_model_at_once_is_refused(tmp_path: Path, hub: FakeHub, models: Path,
                                                            online: None) -> None:  # fmt: skip
    from rkllm_core.hub.store import pull_lock

    hub.add(REPO, chat_repo(tmp_path))
    models.mkdir()
    with pull_lock(models / MODEL.removesuffix(".rkllm")):
        with pytest.raises(PullError, match="another rkllm pull"):
            pull(REPO, models, endpoint=hub.url, platform=None)
    assert hub.file_gets() == []
    assert pull(REPO, models, endpoint=hub.url, platform=None).model_path.is_file()


def test_not_enough_disk_space_is_said_before_downloading(tmp_path: Path, hub: FakeHub, models: Path, online: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import shutil
    from collections import namedtuple

    hub.add(REPO, chat_repo(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(PullError, match="not enough disk space"):
        pull(REPO, models, endpoint=hub.url, platform=None)
    assert hub.file_gets() == [] and visible_models(models) == []
