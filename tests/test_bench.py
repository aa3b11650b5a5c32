"""``rkllm bench`` on the simulator: report content, reference matching, partial results, compare."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model
from rkllm_core.tools import bench as bench_module
from rkllm_core.tools.bench import BenchConfig, compare, find_official, official_table, run_bench, to_markdown
from rkllm_core.tools.cli import main

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
SMALL = BenchConfig(prompt_tokens=(128, 300), new_tokens=16, repeat=2, warmup=1)


def test_official_table_matches_by_name_dtype_and_platform(model_dir: Path) -> None:
    table = official_table()
    assert "release-v1.3.0" in table["source"] and table["runtime"] == "1.3.0"
    registry = ModelRegistry([model_dir], platform=None)
    make_model(model_dir, QWEN)
    make_model(model_dir, "Qwen3-0.6B-w4a16-rk3576.rkllm")
    make_model(model_dir, "mymodel-1b-w8a8-rk3588.rkllm")
    by_name = {m.filename: m for m in registry.models()}
    assert find_official(by_name[QWEN], table)["tokens_per_s"] == 32.91  # type: ignore[index]
    assert find_official(by_name["Qwen3-0.6B-w4a16-rk3576.rkllm"], table)["tokens_per_s"] == 24.85  # type: ignore[index]
    assert find_official(by_name["mymodel-1b-w8a8-rk3588.rkllm"], table) is None


def test_run_bench_report(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path) -> None:
    sim.set("token_delay_ms", 1)
    sim.set("prefill_ms_per_token", 0.05)
    make_model(model_dir, QWEN, size_mb=50)
    make_model(model_dir, "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm")
    make_model(model_dir, "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm", yes_token=9693, no_token=2152)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        report = run_bench(m, [], SMALL)
    assert report["simulated"] and report["title"].endswith("(simulated)") and not report["partial"]
    assert [(r["model"], r["prompt_tokens"]) for r in report["results"]] == [("qwen3-0.6b", 128), ("qwen3-0.6b", 300)]
    assert {r["kind"] for r in report["results"]} == {"chat"}
    retrieval = [(r["model"], r["kind"], r["text_tokens"]) for r in report["retrieval"]]
    assert retrieval == [
        ("qwen3-embedding-0.6b", "embedding", 128),
        ("qwen3-embedding-0.6b", "embedding", 300),
        ("qwen3-reranker-0.6b", "reranker", 128),
        ("qwen3-reranker-0.6b", "reranker", 300),
    ]
    for r in report["retrieval"]:
        assert len(r["runs"]) == 2 and r["median"]["items_per_s"] > 0 and r["median"]["tokens_per_s"] > 0
    # Longer texts take longer per item (the simulator paces prefill per token).
    assert report["retrieval"][1]["median"]["ms_per_item"] > report["retrieval"][0]["median"]["ms_per_item"]
    markdown = to_markdown(report)
    assert "| qwen3-embedding-0.6b | embedding | 128 |" in markdown and "pairs" in markdown
    first = report["results"][0]
    assert len(first["runs"]) == 2
    med = first["median"]
    assert med["generate_tokens"] == 16
    assert 100 < med["decode_tps"] < 1100 and 100 < med["decode_tps_wall"] < 1100  # 1 ms per token, paced
    assert med["ttft_ms"] > 0 and med["prefill_tokens"] > 100 and med["memory_mb"] >= 50 and med["rss_mb"] > 0
    assert first["official"]["tokens_per_s"] == 32.91 and first["vs_official"] == pytest.approx(
        med["decode_tps"] / 32.91
    )
    assert report["results"][1]["official"] is None  # the published table is for 128-token prompts only
    md = to_markdown(report)
    assert md.startswith("# RKLLM benchmark") and "| qwen3-0.6b | 128 |" in md and "(simulated)" in md
    assert "not readable:" in md
    json.dumps(report)  # serialisable


def test_interrupt_keeps_partial_results(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path) -> None:
    make_model(model_dir, QWEN)

    def stop_after_first(report: dict[str, object]) -> None:
        raise KeyboardInterrupt

    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        report = run_bench(m, ["qwen3-0.6b"], SMALL, on_result=stop_after_first)
    assert report["partial"] and len(report["results"]) == 1
    assert "PARTIAL" in to_markdown(report)


def test_interrupt_keeps_the_runs_of_the_point_in_progress(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_model(model_dir, QWEN)
    real_run = bench_module._one_run
    calls: list[int] = []

    def interrupted_at_the_third_measured_run(*args: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == (1 + 3) + (1 + 2) + 1:  # point 1 whole; point 2: warm-up, 2 runs, then Ctrl-C
            raise KeyboardInterrupt
        return real_run(*args)

    monkeypatch.setattr(bench_module, "_one_run", interrupted_at_the_third_measured_run)
    config = BenchConfig(prompt_tokens=(32, 64), new_tokens=4, repeat=3, warmup=1)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        report = run_bench(m, ["qwen3-0.6b"], config)
    assert report["partial"]
    first, second = report["results"]
    assert len(first["runs"]) == 3 and "partial" not in first
    assert len(second["runs"]) == 2 and second["partial"] is True and second["prompt_tokens"] == 64
    assert "| qwen3-0.6b | 64 (partial: 2 runs) |" in to_markdown(report)


def test_cli_bench_and_compare(
    sim_paths: dict[str, Path], model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_model(model_dir, QWEN)
    out = tmp_path / "out"
    args = [
        "bench",
        "qwen3-0.6b",
        "--lib",
        str(sim_paths["1.2"]),
        "--model-dir",
        str(model_dir),
        "--out",
        str(out),
        "--prompt-tokens",
        "64",
        "--new-tokens",
        "8",
        "--repeat",
        "1",
        "--warmup",
        "0",
    ]
    assert main(args) == 0
    assert main(args) == 0
    reports = sorted(out.glob("*.json"))
    assert len(reports) >= 1 and sorted(out.glob("*.md"))
    capsys.readouterr()
    a = json.loads(reports[0].read_text())
    assert a["library"]["abi"] == "1.2" and a["results"][0]["median"]["generate_tokens"] == 8
    assert main(["bench", "compare", str(reports[0]), str(reports[-1])]) == 0
    text = capsys.readouterr().out
    assert "| qwen3-0.6b | 64 |" in text and "→" in text
    assert "→" in compare(a, a)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "nope-model"], "no model 'nope-model'"),
        (["bench", "compare", "x.json"], "usage: rkllm bench compare"),
        (["bench", "--repeat", "0"], "must be positive"),
    ],
)
def test_cli_bench_errors_are_messages(
    sim_paths: dict[str, Path], model_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    make_model(model_dir, QWEN)
    cmd = [
        sys.executable,
        "-m",
        "rkllm_core.tools.cli",
        *args,
        "--lib",
        str(sim_paths["1.3"]),
        "--model-dir",
        str(model_dir),
        "--out",
        str(tmp_path),
    ]
    if args[1] == "compare":
        cmd = [sys.executable, "-m", "rkllm_core.tools.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bench_without_models(sim_paths: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rkllm_core.tools.cli",
            "bench",
            "--lib",
            str(sim_paths["1.3"]),
            "--model-dir",
            str(empty),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and str(empty) in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bench_without_library(tmp_path: Path, model_dir: Path) -> None:
    make_model(model_dir, QWEN)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rkllm_core.tools.cli",
            "bench",
            "--lib",
            str(tmp_path / "missing.so"),
            "--model-dir",
            str(model_dir),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "missing.so" in proc.stderr and "Traceback" not in proc.stderr


def test_each_load_is_shown_on_a_line_of_its_own(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path
) -> None:
    make_model(model_dir, QWEN, size_mb=2)
    make_model(model_dir, "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm")
    progress = io.StringIO()
    config = BenchConfig(prompt_tokens=(16,), new_tokens=4, repeat=1, warmup=1)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        run_bench(m, [], config, progress=progress)
    lines = progress.getvalue().split("\n")
    loads = [line for line in lines if "loading" in line]
    assert [line.split(" (")[0] for line in loads] == ["loading qwen3-0.6b", "loading qwen3-embedding-0.6b"], lines
    assert all(line.startswith("loading ") and re.search(r"… \d+\.\d s$", line) for line in loads), lines
    assert "loading qwen3-0.6b (2 MB)" in loads[0]
