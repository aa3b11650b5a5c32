"""``rkllm demo``, ``python -m rkllm_core.sim`` and the quickstart: the path of a new user without a board.

Every command runs in a subprocess with its own HOME and XDG directories under
the test's temporary directory, so nothing reads or writes the real ``~/.cache``.
The simulator the session already built is reused through a symlinked cache.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_core.sim import DEMO_MODELS, SimulatorControl, make_model

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "qwen3-0.6b": "chat",
    "qwen3-1.7b": "chat",
    "qwen3-embedding-0.6b": "embedding",
    "qwen3-reranker-0.6b": "reranker",
}
_OUR_VARS = ("RKLLM_LIB_PATH", "RKLLM_MODEL_DIR", "RKLLM_MODEL", "RKLLM_EMBED_MODEL", "RKLLM_RERANK_MODEL", "RKLLM_ABI")


def _home(base: Path, sim_cache: Path | None) -> dict[str, str]:
    """An environment whose HOME and XDG directories are under ``base`` (the simulator cache shared if given)."""
    for sub in ("home", "cache", "data", "config", "work"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    if sim_cache is not None:
        (base / "cache" / "rkllm-core").mkdir(exist_ok=True)
        (base / "cache" / "rkllm-core" / "sim").symlink_to(sim_cache, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in _OUR_VARS}
    env.update(
        HOME=str(base / "home"),
        XDG_CACHE_HOME=str(base / "cache"),
        XDG_DATA_HOME=str(base / "data"),
        XDG_CONFIG_HOME=str(base / "config"),
        RKLLM_SIM_TOKEN_DELAY_MS="0",
        RKLLM_SIM_PREFILL_MS_PER_TOKEN="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def run(env: dict[str, str], *args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=cwd or Path(env["HOME"]).parent / "work",
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def exports(stdout: str) -> dict[str, str]:
    """The variables of ``export NAME=VALUE`` lines, unquoted the way a shell does."""
    result = {}
    for line in stdout.splitlines():
        word, assignment = shlex.split(line)
        assert word == "export"
        name, _, value = assignment.partition("=")
        result[name] = value
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, sim_paths: dict[str, Path], sim_cache: Path) -> dict[str, object]:
    """One ``rkllm demo`` run in a fresh home: its environment, result and the exported variables."""
    base = tmp_path_factory.mktemp("demo")
    env = _home(base, sim_cache)
    proc = run(env, "-m", "rkllm_core.tools", "demo")
    assert proc.returncode == 0, proc.stderr
    return {"base": base, "env": env, "proc": proc, "exports": exports(proc.stdout)}


def _applied(demo: dict[str, object]) -> dict[str, str]:
    env = dict(demo["env"])  # type: ignore[call-overload]
    env.update(demo["exports"])  # type: ignore[call-overload]
    return env


def test_demo_prints_exactly_the_two_exports(demo: dict[str, object]) -> None:
    proc = demo["proc"]
    assert isinstance(proc, subprocess.CompletedProcess)
    assert [line.split("=")[0] for line in proc.stdout.splitlines()] == [
        "export RKLLM_LIB_PATH",
        "export RKLLM_MODEL_DIR",
    ]
    values = demo["exports"]
    assert isinstance(values, dict)
    base = demo["base"]
    assert isinstance(base, Path)
    assert Path(values["RKLLM_MODEL_DIR"]) == base / "cache" / "rkllm" / "demo" / "models"
    assert Path(values["RKLLM_LIB_PATH"]).is_file()
    assert SimulatorControl(values["RKLLM_LIB_PATH"]).abi == "1.3"


def test_demo_explains_on_stderr_what_it_made_and_what_to_run_next(demo: dict[str, object]) -> None:
    proc = demo["proc"]
    assert isinstance(proc, subprocess.CompletedProcess)
    err = proc.stderr
    assert "SIMULATOR" in err and "NPU" in err
    for name, kind in EXPECTED.items():
        assert any(line.split()[:2] == [name, kind] for line in err.splitlines()), (name, err)
    nexts = err[err.index("Next") :].splitlines()
    for command in ('eval "$(rkllm demo)"', "rkllm models", "rkllm chat qwen3-0.6b", "rkllm serve"):
        assert f"  {command}" in nexts, (command, err)


def test_the_exports_work_in_a_shell_and_rkllm_models_lists_the_demo_set(demo: dict[str, object]) -> None:
    env = demo["env"]
    assert isinstance(env, dict)
    py = shlex.quote(sys.executable)
    script = f'eval "$({py} -m rkllm_core.tools demo 2>/dev/null)" && {py} -m rkllm_core.tools models --json'
    proc = subprocess.run(
        ["sh", "-c", script], env=env, cwd=Path(env["HOME"]), capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert {row["name"]: row["kind"] for row in json.loads(proc.stdout)} == EXPECTED


def test_the_table_of_rkllm_models_names_the_kinds(demo: dict[str, object]) -> None:
    proc = run(_applied(demo), "-m", "rkllm_core.tools", "models")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[2:]}
    assert rows == EXPECTED


def test_rkllm_chat_streams_an_answer_from_the_demo_model(demo: dict[str, object]) -> None:
    proc = run(_applied(demo), "-m", "rkllm_core.tools", "chat", "qwen3-0.6b", stdin="hello there\n")
    assert proc.returncode == 0, proc.stderr
    assert "chatting with qwen3-0.6b" in proc.stdout
    assert "Echo: hello there" in proc.stdout


def test_the_demo_embedding_and_reranker_models_work_through_the_embedding_engine(demo: dict[str, object]) -> None:
    code = (
        "import json\n"
        "from rkllm_core.embed import EmbeddingEngine\n"
        "engine = EmbeddingEngine()\n"
        "emb = engine.embed('qwen3-embedding-0.6b', ['the npu runs models', 'bananas are yellow'])\n"
        "rr = engine.rerank('qwen3-reranker-0.6b', 'npu cores', ['the rk3588 npu has three cores', 'bananas'])\n"
        "print(json.dumps({'vectors': emb.vectors, 'scores': rr.scores}))\n"
    )
    proc = run(_applied(demo), "-c", code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    first, second = out["vectors"]
    assert len(first) == len(second) > 0 and first != second
    assert abs(sum(x * x for x in first) - 1.0) < 1e-3  # the recipe's L2 normalisation
    relevant, unrelated = out["scores"]
    assert relevant > unrelated


def _stamps(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in paths}


def test_running_demo_again_rewrites_nothing(demo: dict[str, object]) -> None:
    values = demo["exports"]
    assert isinstance(values, dict)
    files = [*Path(values["RKLLM_MODEL_DIR"]).iterdir(), Path(values["RKLLM_LIB_PATH"])]
    old = 1_000_000_000_000_000_000  # 2001: a rewrite would stamp the file with the present
    for path in files:
        os.utime(path, ns=(old, old))
    before = _stamps(files)
    proc = run(_applied(demo), "-m", "rkllm_core.tools", "demo")
    assert proc.returncode == 0, proc.stderr
    assert exports(proc.stdout) == values
    assert _stamps(files) == before
    assert sorted(p.name for p in Path(values["RKLLM_MODEL_DIR"]).iterdir()) == sorted(m.filename for m in DEMO_MODELS)


def test_demo_with_abi_12_and_a_relative_dir_with_a_space(demo: dict[str, object]) -> None:
    env = demo["env"]
    assert isinstance(env, dict)
    cwd = Path(env["HOME"]).parent / "work"
    proc = run(env, "-m", "rkllm_core.tools", "demo", "--abi", "1.2", "--dir", "my models", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    values = exports(proc.stdout)
    assert Path(values["RKLLM_MODEL_DIR"]) == cwd / "my models"
    assert SimulatorControl(values["RKLLM_LIB_PATH"]).abi == "1.2"
    assert sorted(p.name for p in (cwd / "my models").iterdir()) == sorted(m.filename for m in DEMO_MODELS)
    assert "--abi 1.2" in proc.stderr  # the eval hint repeats the options


def test_demo_without_a_compiler_says_so_without_a_traceback(tmp_path: Path) -> None:
    env = _home(tmp_path, None)  # a fresh cache: the simulator must be built
    env["PATH"] = str(tmp_path / "empty-bin")
    env.pop("CC", None)
    proc = run(env, "-m", "rkllm_core.tools", "demo")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("rkllm: error: no C compiler found")
    assert "Traceback" not in proc.stderr


def test_python_m_sim_keeps_its_lines_and_says_how_to_use_them(demo: dict[str, object]) -> None:
    env = demo["env"]
    assert isinstance(env, dict)
    proc = run(env, "-m", "rkllm_core.sim")
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [abi for abi, _ in lines] == ["1.2", "1.3"]
    assert all(SimulatorControl(path).abi == abi for abi, path in lines)
    assert "SIMULATOR" in proc.stderr and "RKLLM_LIB_PATH=" in proc.stderr and 'eval "$(rkllm demo)"' in proc.stderr


def test_make_model_leaves_an_identical_file_alone_and_rewrites_a_different_one(tmp_path: Path) -> None:
    path = make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm", size_mb=2)
    old = 1_000_000_000_000_000_000
    os.utime(path, ns=(old, old))
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm", size_mb=2)
    assert path.stat().st_mtime_ns == old
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm", size_mb=2, think=False)
    assert path.read_bytes().startswith(b"RKLLMSIM 1\nthink=0\n")
    assert path.stat().st_size == 2 * 1024 * 1024
    make_model(tmp_path, "Qwen3-0.6B-rk3588-w8a8.rkllm", size_mb=3, think=False)
    assert path.stat().st_size == 3 * 1024 * 1024


def test_the_quickstart_makes_the_demo_set_where_rkllm_demo_does_and_says_what_next(
    tmp_path: Path, sim_paths: dict[str, Path], sim_cache: Path
) -> None:
    env = _home(tmp_path, sim_cache)
    env["RKLLM_LIB_PATH"] = str(sim_paths["1.3"])  # the simulator, as if found: no real runtime is used
    proc = run(env, str(ROOT / "examples" / "quickstart.py"), "qwen3-0.6b", "hi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RUNNING ON THE SIMULATOR" in proc.stderr
    assert "Echo: hi" in proc.stdout
    tail = proc.stdout.split("Next, try the rkllm command:\n")[1].splitlines()
    commands = [line.split("#")[0].strip() for line in tail]
    if sys.prefix != sys.base_prefix:  # run from a virtualenv: say how to put its rkllm on the PATH
        assert commands[0] == f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"
        commands = commands[1:]
    assert commands == ['eval "$(rkllm demo)"', "rkllm models", "rkllm chat qwen3-0.6b", "rkllm serve"]
    made = tmp_path / "cache" / "rkllm" / "demo" / "models"
    files = sorted(made.iterdir())
    assert [p.name for p in files] == sorted(m.filename for m in DEMO_MODELS)
    old = 1_000_000_000_000_000_000
    for path in files:
        os.utime(path, ns=(old, old))
    again = run(env, "-m", "rkllm_core.tools", "demo")
    assert again.returncode == 0, again.stderr
    assert exports(again.stdout)["RKLLM_MODEL_DIR"] == str(made)
    assert all(p.stat().st_mtime_ns == old for p in files)  # the same set: rkllm demo had nothing to write


def test_demo_on_a_machine_with_a_runtime_says_the_exports_point_away_from_it(demo: dict[str, object]) -> None:
    env = dict(demo["env"])  # type: ignore[call-overload]
    real = Path(env["HOME"]) / "lib" / "librkllmrt.so"
    real.parent.mkdir(exist_ok=True)
    real.write_bytes(b"")  # found by its name; demo never loads it
    env["RKLLM_LIB_PATH"] = str(real)
    proc = run(env, "-m", "rkllm_core.tools", "demo")
    assert proc.returncode == 0, proc.stderr
    assert f"this machine has an NPU runtime ({real})" in proc.stderr
    assert exports(proc.stdout) == demo["exports"]  # still the simulator's
