"""No traceback for any bad input: each mistake is one ``rkllm: error: ...`` line and a non-zero exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rkllm_core.sim import make_model

# (name, arguments with {lib} {models} {tmp} {embed} {garbage} {file} placeholders, expected exit status or None
# for any non-zero one, text expected in stderr)
CASES = [
    ("subcommand typo", ["chta", "qwen3-0.6b"], 2, "invalid choice"),
    ("option typo", ["models", "--jsn"], 2, "unrecognized arguments"),
    ("bad option value", ["bench", "--repeat", "many"], 2, "invalid int value"),
    ("unknown model (chat)", ["chat", "nope", "--lib", "{lib}", "--model-dir", "{models}"], 2, "no model 'nope'"),
    (
        "unknown model (bench)",
        ["bench", "nope", "--lib", "{lib}", "--model-dir", "{models}", "--out", "{tmp}"],
        2,
        "nope",
    ),
    ("unknown model (doctor)", ["doctor", "nope", "--lib", "{lib}", "--model-dir", "{models}"], 1, ""),
    ("wrong kind (chat)", ["chat", "{embed}", "--lib", "{lib}"], 2, "is an embedding model"),
    ("missing file (chat)", ["chat", "{tmp}/gone/x.rkllm", "--lib", "{lib}"], 2, "does not exist"),
    ("missing file (bench)", ["bench", "{tmp}/gone/x.rkllm", "--lib", "{lib}", "--out", "{tmp}"], 2, "does not exist"),
    ("missing file (doctor)", ["doctor", "{tmp}/gone/x.rkllm", "--lib", "{lib}"], 1, ""),
    ("missing reports", ["bench", "compare", "{tmp}/a.json", "{tmp}/b.json"], 2, "a.json"),
    ("report not JSON", ["bench", "compare", "{garbage}", "{garbage}"], 2, "is not an rkllm bench report"),
    ("directory as model (chat)", ["chat", "{models}", "--lib", "{lib}"], 2, "is not a .rkllm model file"),
    ("directory as model (bench)", ["bench", "{models}", "--lib", "{lib}", "--out", "{tmp}"], 2, "is not a .rkllm"),
    ("directory as model (doctor)", ["doctor", "{models}", "--lib", "{lib}"], 1, ""),
    ("file as --out", ["bench", "qwen3-0.6b", "--lib", "{lib}", "--model-dir", "{models}", "--out", "{file}"], 2, ""),
    ("file as --model-dir", ["models", "--model-dir", "{file}"], 1, "no .rkllm models found"),
    ("missing --model-dir", ["chat", "x", "--lib", "{lib}", "--model-dir", "{tmp}/none"], 2, "no .rkllm models"),
    ("library is a directory", ["chat", "qwen3-0.6b", "--lib", "{tmp}", "--model-dir", "{models}"], 2, ""),
    ("library is garbage", ["chat", "qwen3-0.6b", "--lib", "{garbage}", "--model-dir", "{models}"], 2, ""),
    ("bad library (bench)", ["bench", "--lib", "{garbage}", "--model-dir", "{models}", "--out", "{tmp}"], 2, ""),
    ("bad library (info)", ["info", "--lib", "{garbage}"], 0, ""),
    ("no server", ["ps", "--url", "http://127.0.0.1:9"], 1, "no rkllm server"),
    ("not a URL", ["ps", "--url", "localhost:8080"], 1, "is not an http"),
    ("broken URL", ["ps", "--url", "http://[::1"], 1, "is not a usable URL"),
    ("bad port in URL", ["ps", "--url", "http://127.0.0.1:port"], 1, "is not a usable URL"),
    ("garbage model file", ["chat", "{garbage_model}", "--lib", "{lib}"], 2, "rkllm_init failed"),
    ("port out of range", ["serve", "--port", "99999", "--lib", "{lib}", "--model-dir", "{models}"], 2, "0-65535"),
    ("port not a number", ["serve", "--port", "http"], 2, "not a port number"),
]


@pytest.fixture
def places(sim_paths: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    models = tmp_path / "models"
    make_model(models)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("this is not JSON, nor a library")
    (tmp_path / "file").write_text("a file")
    bad_model = tmp_path / "bad" / "Broken-0.5B.rkllm"
    bad_model.parent.mkdir()
    bad_model.write_bytes(b"\x00garbage")
    return {
        "lib": str(sim_paths["1.3"]),
        "models": str(models),
        "tmp": str(tmp_path),
        "embed": str(make_model(tmp_path / "embed", "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm")),
        "garbage": str(garbage),
        "file": str(tmp_path / "file"),
        "garbage_model": str(bad_model),
    }


def run_rkllm(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RKLLM_MODEL_DIR", "RKLLM_SERVER_URL")}
    return subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(("name", "args", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_message_not_a_traceback(
    places: dict[str, str], name: str, args: list[str], status: int, message: str
) -> None:
    proc = run_rkllm([a.format(**places) for a in args], stdin="hello\n")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    if proc.stderr.strip():  # the last word is the one-line error (after any warnings)
        assert re.match(r"rkllm( \w+)?: error: ", proc.stderr.strip().splitlines()[-1]), proc.stderr
    elif status != 0:
        assert "[FAIL]" in proc.stdout  # rkllm doctor: the failing check is in its report


def test_ctrl_c_while_the_model_loads(places: dict[str, str]) -> None:
    env = {**os.environ, "RKLLM_SIM_INIT_DELAY_MS": "20000"}
    args = ["chat", "qwen3-0.6b", "--lib", places["lib"], "--model-dir", places["models"]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkllm_core.tools", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    loading = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read(1), ""):  # type: ignore[union-attr]
            seen.append(chunk)
            if "loading qwen3-0.6b" in "".join(seen[-40:]):
                loading.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert loading.wait(60), "".join(seen)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=90)
    reader.join(10)
    err = "".join(seen)
    assert proc.returncode == 130 and "rkllm: error: interrupted" in err and "Traceback" not in err, err


def test_ctrl_c_at_the_prompt_keeps_the_chat(places: dict[str, str]) -> None:
    args = ["chat", "qwen3-0.6b", "--lib", places["lib"], "--model-dir", places["models"]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkllm_core.tools", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdin is not None and proc.stdout is not None
    seen: list[str] = []
    prompts = [threading.Event(), threading.Event()]

    def read() -> None:
        count = 0
        for chunk in iter(lambda: proc.stdout.read(1), ""):  # type: ignore[union-attr]
            seen.append(chunk)
            if "".join(seen[-2:]) == "> " and count < len(prompts):
                prompts[count].set()
                count += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert prompts[0].wait(60), "".join(seen)
    # At the prompt Ctrl-C gives a new prompt, not the end. A signal that lands between the prompt and
    # the read the prompt waits in is only seen at the next input, as for any program: send it again.
    for _ in range(60):
        proc.send_signal(signal.SIGINT)
        if prompts[1].wait(1):
            break
    assert prompts[1].is_set(), "".join(seen)
    proc.stdin.write("hello\n/exit\n")
    proc.stdin.flush()
    proc.stdin.close()
    proc.wait(timeout=60)
    reader.join(10)
    err = proc.stderr.read() if proc.stderr is not None else ""
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "Echo: hello — ok." in "".join(seen)


@pytest.mark.parametrize("encoding", ["utf-8:strict", "utf-8:surrogateescape"])
def test_a_line_that_is_not_text_is_refused_alone(places: dict[str, str], encoding: str) -> None:
    args = ["chat", "qwen3-0.6b", "--lib", places["lib"], "--model-dir", places["models"]]
    proc = subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools", *args],
        input=b"caf\xe9\na\x00b\nhi\n",
        capture_output=True,
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": encoding},
    )
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "Echo: hi — ok." in out and err.count("not valid text") == 1 and "NUL character" in err
