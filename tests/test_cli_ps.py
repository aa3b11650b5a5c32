"""``rkllm ps`` against a real ``rkllm serve`` app on a free port."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")

from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.serve import ServerSettings, create_app  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402
from rkllm_core.tools.cli import main  # noqa: E402
from rkllm_core.tools.ps import until  # noqa: E402


@pytest.fixture
def manager(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ModelManager]:
    make_model(model_dir, size_mb=3)
    make_model(model_dir, "gemma-3-1b-it_w8a8.rkllm")
    m = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=2)
    yield m
    m.close()


def serve(manager: ModelManager, **settings: object) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(manager, ServerSettings(**settings))  # type: ignore[arg-type]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(20)


@pytest.fixture
def server(manager: ModelManager) -> Iterator[str]:
    yield from serve(manager)


@pytest.mark.parametrize("abi", ["1.3"], indirect=True)
def test_ps_lists_what_the_server_has_loaded(
    server: str, manager: ModelManager, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["ps", "--url", server]) == 0
    assert "no models loaded" in capsys.readouterr().out
    with manager.lease("qwen3-0.6b"):
        pass
    assert main(["ps", "--url", server]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE_MB", "CONTEXT", "UNTIL"]
    assert lines[2].split()[:3] == ["qwen3-0.6b", "3.0", "4096"] and "gemma" not in "\n".join(lines)
    monkeypatch.setenv("RKLLM_SERVER_URL", server)  # the default server
    assert main(["ps", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "qwen3-0.6b:latest" and row["context_length"] == 4096  # as the server says


@pytest.mark.parametrize("abi", ["1.3"], indirect=True)
def test_ps_sends_the_api_key(
    manager: ModelManager, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for url in serve(manager, api_key="sesame"):
        monkeypatch.delenv("RKLLM_API_KEY", raising=False)
        assert main(["ps", "--url", url]) == 1
        assert "401" in capsys.readouterr().err
        monkeypatch.setenv("RKLLM_API_KEY", "sesame")
        assert main(["ps", "--url", url]) == 0
        assert "no models loaded" in capsys.readouterr().out


def test_ps_without_a_server_is_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["ps", "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rkllm: error: no rkllm server at") and "rkllm serve" in err


def test_until() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert until((now + timedelta(minutes=4, seconds=30)).isoformat(), now) == "4 minutes from now"
    assert until((now + timedelta(hours=1)).isoformat().replace("+00:00", "Z"), now) == "1 hour from now"
    assert until((now + timedelta(days=3650)).isoformat(), now) == "forever"
    assert until((now - timedelta(seconds=1)).isoformat(), now) == "now"
    assert until("", now) == ""
