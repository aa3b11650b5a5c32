"""The LlamaIndex examples run end to end on the simulator: scripts in subprocesses, the notebook via nbclient."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")

from rkllm_core.errors import LibraryNotFoundError  # noqa: E402
from rkllm_core.native.library import find_library  # noqa: E402
from rkllm_core.sim import make_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
_OUR_VARS = ("RKLLM_LIB_PATH", "RKLLM_MODEL_DIR", "RKLLM_MODEL", "RKLLM_EMBED_MODEL", "RKLLM_RERANK_MODEL", "RKLLM_ABI")


@pytest.fixture
def sim_env(sim_paths: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    """Environment pointing the examples at the simulator and a model directory."""
    models = tmp_path / "models"
    make_model(models, QWEN)
    env = {k: v for k, v in os.environ.items() if k not in _OUR_VARS}
    env.update(
        RKLLM_LIB_PATH=str(sim_paths["1.3"]),
        RKLLM_MODEL_DIR=str(models),
        RKLLM_PROMPT_CACHE_DIR=str(tmp_path / "prompt-cache"),
        RKLLM_SIM_TOKEN_DELAY_MS="0",
        RKLLM_SIM_PREFILL_MS_PER_TOKEN="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def run_example(name: str, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_rag_example(sim_env: dict[str, str], sim_paths: dict[str, Path], tmp_path: Path, abi: str) -> None:
    report = tmp_path / "sim-report.json"
    env = {**sim_env, "RKLLM_LIB_PATH": str(sim_paths[abi]), "RKLLM_SIM_REPORT": str(report)}
    proc = run_example("llamaindex_rag.py", env, tmp_path)
    out = proc.stdout
    assert "RUNNING ON THE SIMULATOR" in proc.stderr
    assert "indexed 3 files" in out
    assert "embeddings: qwen3-embedding-0.6b; reranker: qwen3-reranker-0.6b (simulated)" in out
    assert out.count("Echo: Context information is below.") == 2
    answers = out.split("\n> ")[1:]
    assert answers[0].startswith("How many NPU cores does the RK3588 have?")
    assert "sources: rk3588.txt" in answers[0]  # embedded, retrieved and reranked on the (simulated) NPU
    assert "sources: boards.txt" in answers[1]
    assert "prompt tokens prefilled" in out
    counters = json.loads(report.read_text())  # written by the simulator as the process exited
    assert counters["inits"] == 3 and counters["live_handles"] == 0  # three models, no swaps, no leak
    assert counters["concurrent_run_violations"] == 0 and counters["destroy_while_running"] == 0


def test_rag_example_with_own_question(sim_env: dict[str, str], tmp_path: Path) -> None:
    out = run_example("llamaindex_rag.py", sim_env, tmp_path, "What does librkllmrt.so do?").stdout
    assert "> What does librkllmrt.so do?" in out and "sources: rkllm.txt" in out


def test_chat_engine_example(sim_env: dict[str, str], tmp_path: Path) -> None:
    out = run_example("llamaindex_chat_engine.py", sim_env, tmp_path).stdout
    part1, part2 = out.split("=== part 2")
    assert part1.count("[turn ") == 3 and part2.count("[turn ") == 3
    assert "Echo: How many cores does the RK3588 NPU have? — ok." in part1
    assert part1.count("2 LLM call(s)") == 2 and "KV cache reused" not in part1  # condense evicts the chat
    assert part2.count("1 LLM call(s)") == 3 and part2.count("(KV cache reused)") == 2
    assert "from the prompt cache" in part2  # turn 1 of part 2 starts like turn 1 of part 1


def test_agent_example(sim_env: dict[str, str], tmp_path: Path) -> None:
    out = run_example("llamaindex_agent.py", sim_env, tmp_path).stdout
    assert "tool call: multiply({'a': 6, 'b': 7}) -> 42" in out
    assert "answer: Tool result: 42" in out
    assert "[2 LLM calls:" in out and "(KV cache reused)" in out


def test_agent_example_other_tool(sim_env: dict[str, str], tmp_path: Path) -> None:
    out = run_example("llamaindex_agent.py", sim_env, tmp_path, "How many NPU cores? Call npu_cores('rk3576').").stdout
    assert "tool call: npu_cores({'chip': 'rk3576'}) -> rk3576 has 2 NPU cores" in out


def test_examples_fall_back_to_the_simulator_loudly(sim_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in sim_env.items() if k not in ("RKLLM_LIB_PATH", "RKLLM_MODEL_DIR")}
    try:
        find_library()
    except LibraryNotFoundError:
        pass
    else:
        pytest.skip("a runtime library is installed here; the fallback cannot be exercised")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # simulator build and demo model go here
    proc = run_example("llamaindex_agent.py", env, tmp_path)
    assert "NO NPU RUNTIME (librkllmrt.so) FOUND -- RUNNING ON THE SIMULATOR." in proc.stderr
    assert "answer: Tool result: 42" in proc.stdout


def copy_examples(dest: Path) -> Path:
    """A copy of examples/ at ``dest``: the examples must not depend on the folder they are in."""
    shutil.copytree(EXAMPLES, dest, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dest


# Two folders whose paths differ in length by 60 characters: before the documents' paths were kept out of the
# prompts, the longer one cut other chunks, retrieved other passages and rebuilt the chat the shorter one reused.
FOLDERS = {"short": "ex", "long": "examples-in-a-folder-whose-name-is-sixty-characters-longer-x"}


def test_documents_read_the_same_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from llamaindex_setup import load_documents

    texts = {}
    for name, folder in FOLDERS.items():
        documents = load_documents(copy_examples(tmp_path / folder) / "data")
        assert sorted(d.metadata["file_name"] for d in documents) == ["boards.txt", "rk3588.txt", "rkllm.txt"]
        nodes = SentenceSplitter(chunk_size=96, chunk_overlap=20).get_nodes_from_documents(documents)
        texts[name] = sorted(n.get_content(mode) for n in nodes for mode in (MetadataMode.EMBED, MetadataMode.LLM))
        assert all(str(tmp_path) not in t for t in texts[name])
        assert any(t.startswith("The RK3588 is a system-on-chip from Rockchip.") for t in texts[name])  # no header
    assert texts["short"] == texts["long"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("folder", list(FOLDERS))
def test_notebook_runs(sim_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    examples = copy_examples(tmp_path / FOLDERS[folder])
    nb = nbformat.read(examples / "llamaindex_rag.ipynb", as_version=4)
    for cell in nb.cells:  # the notebook is stored without outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None
    for key, value in sim_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    for key in _OUR_VARS:
        if key not in sim_env:
            monkeypatch.delenv(key, raising=False)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(examples)}}
    )
    client.execute()
    text = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "is_function_calling_model=True" in text
    assert text.count("Echo: Context information is below.") == 3
    assert "('rk3588.txt'" in text
    assert "(KV cache reused)" in text  # the follow-up retrieved the same passages: only the question is prefilled
    assert str(tmp_path) not in text  # no path reached a prompt (the simulator echoes prompts)
