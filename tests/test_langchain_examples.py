"""The LangChain examples and notebook run end to end on the simulator.

Each script runs in a subprocess with ``RKLLM_LIB_PATH`` pointing at a built simulator,
``RKLLM_MODEL_DIR`` at a directory of simulator model files and no token pacing; the
notebook is executed with nbclient on the ``python3`` kernel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_core.sim import make_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"


@pytest.fixture(scope="module")
def example_env(sim_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    models = tmp_path_factory.mktemp("lc-example-models")
    make_model(models, QWEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    env.update(
        RKLLM_LIB_PATH=str(sim_paths["1.3"]),
        RKLLM_MODEL_DIR=str(models),
        RKLLM_SIM_TOKEN_DELAY_MS="0",
        RKLLM_SIM_PREFILL_MS_PER_TOKEN="0",
        RKLLM_PROMPT_CACHE_DIR=str(tmp_path_factory.mktemp("lc-example-pcache")),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def run_example(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "RUNNING ON THE SIMULATOR" in proc.stderr  # never silent about simulated answers
    return proc


def test_chain(example_env: dict[str, str]) -> None:
    out = run_example("langchain_chain.py", example_env, "What is an NPU?").stdout
    assert "model: qwen3-0.6b (simulated)" in out
    assert out.count("Echo: What is an NPU? — ok.") == 2  # invoked, then streamed
    assert "batch: Echo: Name a Rockchip SoC. — ok." in out and "batch: Echo: Name an RKLLM model. — ok." in out


def test_streaming(example_env: dict[str, str]) -> None:
    out = run_example("langchain_streaming.py", example_env).stdout
    assert "Echo: Why is the sky blue? — ok." in out
    assert "[finish: stop; tokens in:" in out and "prefilled on the NPU:" in out
    assert "1 2 3 4 5 6 7 8 9 10\n" in out  # the async stream
    assert "[stopped early: generation aborted]" in out
    assert "999 1000" not in out  # the generation was cut short


def test_multiturn_shows_kv_reuse(example_env: dict[str, str]) -> None:
    out = run_example("langchain_multiturn.py", example_env).stdout
    lines = [line for line in out.splitlines() if line.startswith("[turn ")]
    assert len(lines) == 4
    assert "KV reused: False" in lines[0] and all("KV reused: True" in line for line in lines[1:])
    for line in lines[1:]:
        words = line.replace(",", "").split()
        input_tokens, prefilled = int(words[words.index("input") + 1]), int(words[words.index("prefilled") + 1])
        assert prefilled < input_tokens / 2
    assert "Echo: How many NPU cores does that SoC have? — ok." in out


def test_agent_calls_a_tool_then_answers(example_env: dict[str, str]) -> None:
    if importlib.util.find_spec("langchain") is None and importlib.util.find_spec("langgraph") is None:
        pytest.skip("the agent example needs langchain or langgraph")
    out = run_example("langchain_agent.py", example_env).stdout
    assert "[tool call] get_weather({'location': 'Paris'})" in out
    assert "[tool result] It is 21 °C and sunny in Paris." in out
    assert "[answer] Tool result: It is 21 °C and sunny in Paris." in out
    assert out.index("[tool call]") < out.index("[tool result]") < out.index("[answer]")


def test_structured(example_env: dict[str, str]) -> None:
    out = run_example("langchain_structured.py", example_env).stdout
    assert "function_calling -> Board(name='Orange Pi 5'" in out
    assert "json_schema -> Board(name='Orange Pi 5'" in out
    assert "TypedDict -> {'answer':" in out
    assert "include_raw -> parsed=Board(" in out and "tool calls in raw=1" in out


def test_notebook_runs(example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    for key, value in example_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(EXAMPLES / "langchain_quickstart.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "stored outputs"
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    # stdout only, joined as written: the kernel splits stdout into several outputs whenever the
    # runtime's own stderr lines (written from C, captured asynchronously) land in between.
    text = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )
    assert "Echo: What is an NPU? — ok." in text
    assert "KV reused: True" in text
    assert "'name': 'get_weather'" in text and "It is sunny in Paris." in text
    assert "name='Orange Pi 5'" in text and "name='Rock 5B'" in text
    assert "reasoning: The user wrote" in text


def test_concurrency_over_two_models(example_env: dict[str, str]) -> None:
    out = run_example("langchain_concurrency.py", example_env).stdout
    assert "models: qwen3-0.6b and gemma3-270m" in out and "8 answers from two models" in out
    for i in range(4):
        for model in ("qwen3-0.6b", "gemma3-270m"):
            q = f"Question {i}: what is {i} squared?"
            assert f"[{model}] {q} -> Echo: {q} — ok." in out
    assert "(cancelled mid-stream)" in out and "still serving: Echo: Still there? — ok." in out
    assert "nested request refused at once (deadlock)" in out


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_rag_runs_embed_retrieve_rerank_answer_on_the_npu(
    example_env: dict[str, str], sim_paths: dict[str, Path], tmp_path: Path, abi: str
) -> None:
    report = tmp_path / "sim-report.json"
    env = {**example_env, "RKLLM_LIB_PATH": str(sim_paths[abi]), "RKLLM_SIM_REPORT": str(report)}
    out = run_example("langchain_rag.py", env).stdout
    assert "embeddings: qwen3-embedding-0.6b; reranker: qwen3-reranker-0.6b (simulated)" in out
    lines = out.splitlines()
    # The passage that shares the question's words is retrieved and ranked first.
    first = lines[lines.index("> How many NPU cores does the RK3588 have?") + 2]
    assert first.startswith("sources: rk3588.txt (")
    second = lines[lines.index("> Which chip does the Orange Pi 5 use?") + 2]
    assert second.startswith("sources: boards.txt (")
    assert "abatch: 2 answers; loaded: ['qwen3-0.6b', 'qwen3-embedding-0.6b', 'qwen3-reranker-0.6b']" in out
    counters = json.loads(report.read_text())  # written by the simulator as the process exited
    assert counters["inits"] == 3 and counters["live_handles"] == 0  # no swaps, no leaked handle
    assert counters["concurrent_run_violations"] == 0 and counters["destroy_while_running"] == 0
