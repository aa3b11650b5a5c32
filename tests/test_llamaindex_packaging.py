"""The wheel ships ``llama_index.llms.rkllm``, ``llama_index.embeddings.rkllm`` and
``llama_index.postprocessor.rkllm_rerank`` without claiming the ``llama_index`` namespaces."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# our modules under the llama_index namespace, and the class each one exports
OURS = {
    "llama_index.llms.rkllm": "RKLLM",
    "llama_index.embeddings.rkllm": "RKLLMEmbedding",
    "llama_index.postprocessor.rkllm_rerank": "RKLLMRerank",
}
NAMESPACES = ("llama_index", "llama_index/llms", "llama_index/embeddings", "llama_index/postprocessor")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools")
    # Build from a copy so the checkout gets no build/ or egg-info changes.
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("rkllm_core", "langchain_rkllm", "llamaindex_rkllm", "llama_index"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = src / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("boardllm-*.whl")
    return whl


def test_wheel_has_no_namespace_init_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    dirs = [module.replace(".", "/") for module in OURS]
    for d in dirs:
        assert f"{d}/__init__.py" in names and f"{d}/py.typed" in names
    for module in ("base", "embeddings", "postprocessor"):
        assert f"llamaindex_rkllm/{module}.py" in names
    assert "llamaindex_rkllm/py.typed" in names
    for namespace in NAMESPACES:
        assert f"{namespace}/__init__.py" not in names
    assert not [n for n in names if n.startswith("llama_index/") and not n.startswith(tuple(f"{d}/" for d in dirs))]


def test_installed_wheel_shares_the_namespace_with_llama_index_core(wheel: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_index.core")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for namespace in NAMESPACES:
        assert not (site / namespace / "__init__.py").exists()
    code = "import importlib, llama_index.core, llamaindex_rkllm\n" + "".join(
        f"m = importlib.import_module({module!r})\nassert m.{cls} is llamaindex_rkllm.{cls}\nprint(m.__file__)\n"
        for module, cls in OURS.items()
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the checkout, so the installed copy is the one found
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(site.joinpath(*module.split("."), "__init__.py")) for module in OURS]
