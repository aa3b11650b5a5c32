"""The ``rkllm`` console script."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_core.sim import make_model
from rkllm_core.tools.cli import JSON_KEYS, main


def test_models_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", size_mb=10)
    make_model(tmp_path, "gemma-3-1b-it_w8a8.rkllm")
    assert main(["models", "--json", "--model-dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["gemma3-1b", "qwen3-0.6b"]
    for row in rows:
        assert tuple(row) == JSON_KEYS
    qwen = rows[1]
    assert qwen["context_size"] == 16384 and qwen["dtype"] == "w8a8" and qwen["platform"] == "rk3588"
    assert qwen["size_mb"] == 10.0 and qwen["kind"] == "chat"
    assert rows[0]["context_size"] == 4096


def test_models_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm")
    assert main(["models", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "KIND", "FILE", "CONTEXT", "DTYPE", "PLATFORM", "SIZE_MB"]
    assert out[2].split()[:2] == ["qwen3-0.6b", "chat"]


def test_no_models_is_a_clear_message_not_a_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools.cli", "models", "--model-dir", str(empty)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(empty) in proc.stdout + proc.stderr


# -- the CLI on the first try -----------------------------------------------------------------------------------

QWEN17 = "Qwen_Qwen3-1.7B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"


def rkllm(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rkllm_core.tools ARGS`` with ``stdin``."""
    return subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_chat_and_bench_with_a_path_outside_the_model_dirs(sim_paths: dict[str, Path], tmp_path: Path) -> None:
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    make_model(models)
    outside = make_model(elsewhere, QWEN17)
    lib = str(sim_paths["1.3"])
    chat = rkllm("chat", str(outside), "--lib", lib, "--model-dir", str(models), stdin="hello\n")
    assert chat.returncode == 0, chat.stderr
    assert "chatting with qwen3-1.7b" in chat.stdout and "Echo: hello — ok." in chat.stdout
    assert "no model" not in chat.stderr
    bench_args = ["--prompt-tokens", "16", "--new-tokens", "4", "--repeat", "1", "--warmup", "0"]
    bench = rkllm("bench", str(outside), "--lib", lib, "--model-dir", str(models), "--out", str(tmp_path), *bench_args)
    assert bench.returncode == 0, bench.stderr
    assert "| qwen3-1.7b | 16 |" in bench.stdout
    doctor = rkllm("doctor", str(outside), "--lib", lib, "--model-dir", str(models))
    assert "[PASS] stream" in doctor.stdout and "using qwen3-1.7b" in doctor.stdout, doctor.stdout


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("embed", "is an embedding model"),
        ("rerank", "is a reranker model"),
        ("empty", "is empty"),
        ("corrupt", "rkllm_init failed"),
        ("dir", "is not a .rkllm model file"),
        ("missing", "does not exist"),
    ],
)
def test_chat_refuses_a_model_it_cannot_serve_before_the_prompt(
    sim_paths: dict[str, Path], tmp_path: Path, model: str, message: str
) -> None:
    models = tmp_path / "models"
    paths = {
        "embed": make_model(models, "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"),
        "rerank": make_model(models, "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm", yes_token=9693, no_token=2152),
        "empty": models / "Empty-0.5B.rkllm",
        "corrupt": models / "Corrupt-0.5B.rkllm",
        "dir": models,
        "missing": models / "Gone-0.5B.rkllm",
    }
    paths["empty"].write_bytes(b"")
    paths["corrupt"].write_bytes(b"not a model at all")
    proc = rkllm("chat", str(paths[model]), "--lib", str(sim_paths["1.3"]), stdin="hello\n")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "chatting with" not in proc.stdout and "> " not in proc.stdout  # no prompt was opened
    assert message in proc.stderr and "rkllm: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_without_a_runtime_library_fails_before_the_prompt(tmp_path: Path) -> None:
    path = make_model(tmp_path / "models")
    proc = rkllm("chat", str(path), "--lib", str(tmp_path / "missing.so"), stdin="hello\n")
    assert proc.returncode == 2 and "chatting with" not in proc.stdout
    assert "missing.so" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_exits_non_zero_when_every_answer_failed(sim_paths: dict[str, Path], tmp_path: Path) -> None:
    make_model(tmp_path / "models", "Qwen3-0.6B-w8a8-ctx512.rkllm", max_context=512)
    long = " ".join(["word"] * 300)
    args = ["chat", "qwen3-0.6b", "--lib", str(sim_paths["1.3"]), "--model-dir", str(tmp_path / "models")]
    proc = rkllm(*args, stdin=f"{long}\n{long}\n")
    assert proc.returncode == 1 and "every answer failed" in proc.stderr and "Traceback" not in proc.stderr
    proc = rkllm(*args, stdin=f"{long}\nhi\n")  # one answer came: the chat worked
    assert proc.returncode == 0 and "Echo: hi" in proc.stdout


def test_chat_and_bench_show_the_load(sim_paths: dict[str, Path], tmp_path: Path) -> None:
    make_model(tmp_path / "models", size_mb=3)
    lib, models = str(sim_paths["1.3"]), str(tmp_path / "models")
    chat = rkllm("chat", "qwen3-0.6b", "--lib", lib, "--model-dir", models, stdin="hi\n")
    assert re.search(r"loading qwen3-0\.6b \(3 MB\)… (.*\n)*?\d+\.\d s\n", chat.stderr), chat.stderr
    assert chat.stderr.count("loading qwen3-0.6b") == 1
    bench_args = ["--prompt-tokens", "16", "--new-tokens", "4", "--repeat", "1", "--warmup", "0"]
    bench = rkllm("bench", "qwen3-0.6b", "--lib", lib, "--model-dir", models, "--out", str(tmp_path), *bench_args)
    assert bench.returncode == 0 and re.search(r"loading qwen3-0\.6b \(3 MB\)… (.*\n)*?\d+\.\d s\n", bench.stderr)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"rkllm {importlib.metadata.version('boardllm')}"


@pytest.mark.parametrize("command", [["info"], ["models"], ["models", "--json"], ["--help"], ["ps", "--help"]])
def test_a_closed_stdout_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    make_model(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write to the pipe fails (`rkllm info | head -0`)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "rkllm_core.tools",
                *command,
                *(["--model-dir", str(tmp_path)] if command[-1] in ("info", "models", "--json") else []),
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 141)


def test_bench_compare_names_the_bad_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"schema": 1, "title": "t", "system": {}, "library": {}, "results": []}))
    for name, content in (("empty.json", ""), ("text.json", "hello"), ("half.json", '{"schema": 1}')):
        bad = tmp_path / name
        bad.write_text(content)
        proc = rkllm("bench", "compare", str(good), str(bad))
        assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = rkllm("bench", "compare", str(tmp_path / "none.json"), str(good))
    assert proc.returncode == 2 and "none.json" in proc.stderr


def test_a_bad_registry_value_is_told_once_and_the_rest_of_its_entry_applies(
    sim_paths: dict[str, Path], tmp_path: Path
) -> None:
    make_model(tmp_path)
    (tmp_path / "rkllm-models.toml").write_text('[models."qwen3-0.6b"]\naliases = ["small"]\ntemperature = -5\n')
    listed = rkllm("models", "--model-dir", str(tmp_path))
    assert listed.returncode == 0 and listed.stderr.count("temperature") == 1, listed.stderr
    assert listed.stderr.startswith("rkllm: warning: ") and "(ignored)" in listed.stderr
    chat = rkllm("chat", "small", "--lib", str(sim_paths["1.3"]), "--model-dir", str(tmp_path), stdin="hi\n")
    assert chat.returncode == 0 and "chatting with qwen3-0.6b" in chat.stdout  # the alias applies
    assert chat.stderr.count("temperature") == 1, chat.stderr
