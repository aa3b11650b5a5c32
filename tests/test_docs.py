"""Every command and example in README.md and docs/*.md runs, as written, on the simulator.

Each page is run the way a reader would follow it: its fenced ``bash`` (and ``console``) blocks are
sourced one after another by one shell, so an ``export`` or ``eval "$(rkllm demo)"`` in one block holds
for the next, and each ``python`` block is run as a script by that shell, in that environment. The
shell starts in a fresh directory with a private HOME and XDG directories, with the interpreter's
``bin`` directory first on PATH (what ``source .venv/bin/activate`` gives; that line is pointed at the
virtualenv this test runs in, so it works from the temporary directory too). Pages other than the
README start where the README's first steps leave a reader: with the environment ``rkllm demo``
prints, which the session fixture evaluates once.

A block that cannot run here (it needs a board, Docker or the network, or sets up this checkout) is
marked in the markdown with an HTML comment on the line before it, ``<!-- not run: REASON -->``; each
marked block is reported as a skipped test with its reason, so the choice stays visible. Everything
unmarked runs. A server a page starts in the background (``rkllm serve --port 8080 &``) gets a free
port instead of 8080, and the page's process group is ended when the page is done.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import needs_cc

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.+?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "console", "python": "python"}
PAGE_TIMEOUT_S = 180


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int  # of the opening fence, 1-based
    lang: str  # "bash", "console", "python", or another fence language (never run)
    code: str
    not_run: str | None  # the reason given in a ``<!-- not run: ... -->`` comment, if any

    @property
    def runs(self) -> bool:
        """Whether the page run executes this block."""
        return self.lang in ("bash", "console", "python") and self.not_run is None

    def script(self) -> str:
        """The block as shell commands (a console block's ``$ `` lines; others as written)."""
        if self.lang != "console":
            return self.code
        return "\n".join(line[2:] for line in self.code.splitlines() if line.startswith("$ "))


def parse_blocks(text: str, page: str = "<text>") -> list[Block]:
    """Return the fenced code blocks of a markdown text, with their ``not run`` marks."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = len(opening["indent"])
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : end])
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = NOT_RUN.match(before)
        lang = LANGS.get(opening["lang"].lower(), opening["lang"].lower() or "text")
        found.append(Block(page, i + 1, lang, code + "\n", mark["reason"] if mark else None))
        i = end + 1
    return found


def _page_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse_blocks(page.read_text(encoding="utf-8"), page.name)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _activate() -> str:
    """What ``source .venv/bin/activate`` becomes: this virtualenv's activate, or nothing outside one."""
    script = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and script.is_file():
        return f"source {shlex.quote(str(script))}"
    return ":  # not in a virtualenv: PATH already starts with the interpreter's bin directory"


def _driver(blocks: list[Block], workdir: Path, port: int) -> str:
    """One shell script that runs a page's blocks in order and records which block is running."""
    parts = ["set -eo pipefail"]
    for n, block in enumerate(blocks):
        code = re.sub(r"\b8080\b", str(port), block.script())
        parts.append(f"echo {n} > {shlex.quote(str(workdir / '.block'))}")
        if block.lang == "python":
            name = workdir / f".block{n}.py"
            name.write_text(code, encoding="utf-8")
            parts.append(f"{shlex.quote(sys.executable)} {shlex.quote(str(name))}")
        else:
            code = re.sub(r"^source \.venv/bin/activate\b.*$", _activate(), code, flags=re.M)
            name = workdir / f".block{n}.sh"
            name.write_text(code, encoding="utf-8")
            parts.append(f"source {shlex.quote(str(name))}")
    parts.append(f"echo done > {shlex.quote(str(workdir / '.block'))}")
    return "\n".join(parts) + "\n"


def _clean_env(home: Path) -> dict[str, str]:
    """The environment of a new reader: a private HOME and caches, no RKLLM settings of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RKLLM_", "VIRTUAL_ENV"))}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CONFIG_HOME=str(home / ".config"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
    )
    return env


@pytest.fixture(scope="module")
def reader_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private HOME shared by the pages, so the simulator is compiled once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def after_demo(reader_home: Path) -> dict[str, str]:
    """The environment after the README's ``eval "$(rkllm demo)"``: where the later pages start."""
    env = _clean_env(reader_home)
    proc = subprocess.run(
        ["rkllm", "demo"], env=env, capture_output=True, text=True, timeout=PAGE_TIMEOUT_S, check=False
    )
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    exports = dict(w[1].split("=", 1) for w in lines if len(w) == 2 and w[0] == "export" and "=" in w[1])
    assert proc.returncode == 0 and exports.keys() == {"RKLLM_LIB_PATH", "RKLLM_MODEL_DIR"}, (
        f"rkllm demo failed:\n{proc.stdout}\n{proc.stderr}"
    )
    return {**env, **exports}


def _run_page(page: Path, env: dict[str, str], workdir: Path) -> None:
    blocks = [b for b in parse_blocks(page.read_text(encoding="utf-8"), page.name) if b.runs]
    if not blocks:
        pytest.skip(f"{page.name} has no block to run")
    if shutil.which("curl") is None and any("curl " in b.code for b in blocks):
        pytest.skip(f"{page.name} uses curl, which is not installed (apt-get install curl)")
    driver = workdir / ".page.sh"
    driver.write_text(_driver(blocks, workdir, _free_port()), encoding="utf-8")
    log = workdir / ".page.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(driver)], cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=PAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _end_group(proc)
    state = (workdir / ".block").read_text().strip() if (workdir / ".block").exists() else "0"
    if rc == 0 and state == "done":
        return
    block = blocks[int(state) if state.isdigit() else -1]
    what = "timed out" if rc is None else f"exit status {rc}"
    output = log.read_text(encoding="utf-8", errors="replace")[-4000:]
    pytest.fail(f"{page.name}:{block.line} ({block.lang}) {what}:\n{block.code}\n--- output ---\n{output}")


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """End whatever the page left running (a background ``rkllm serve``): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        for _ in range(300):  # the group is gone once every member exited (bounded: 30 s)
            proc.poll()  # reap the shell itself, or its zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    if proc.poll() is None:
        proc.wait(timeout=30)


@needs_cc
def test_the_readme_runs_as_written(reader_home: Path, tmp_path: Path) -> None:
    """The first hour: activate, ``rkllm demo``, models, chat, serve + curl, the framework examples."""
    _run_page(ROOT / "README.md", _clean_env(reader_home), tmp_path)


@needs_cc
@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs"], ids=lambda p: p.name)
def test_each_docs_page_runs_as_written(page: Path, after_demo: dict[str, str], tmp_path: Path) -> None:
    _run_page(page, after_demo, tmp_path)


@pytest.mark.parametrize(
    "block",
    [b for b in _page_blocks() if b.not_run is not None],
    ids=lambda b: f"{b.page}:{b.line}",
)
def test_blocks_marked_not_run(block: Block) -> None:
    """Each marked block is listed as skipped with the reason the page gives."""
    assert block.lang in ("bash", "console", "python"), f"{block.page}:{block.line}: a {block.lang} block never runs"
    pytest.skip(f"{block.page}:{block.line} not run: {block.not_run}")


def test_the_first_hour_is_in_the_readme_and_runs() -> None:
    """The README's next steps are unmarked blocks, so the README run above executes them."""
    readme = [b for b in parse_blocks((ROOT / "README.md").read_text(encoding="utf-8")) if b.runs]
    commands = "\n".join(b.script() for b in readme)
    for step in (
        "source .venv/bin/activate",
        'eval "$(rkllm demo)"',
        "rkllm models",
        "| rkllm chat qwen3-0.6b",
        "rkllm serve --port 8080 &",
        "curl ",
        "ChatRKLLM(model=",
        'RKLLMEmbedding(model_name="qwen3-embedding-0.6b")',
        "VectorStoreIndex.from_documents",
    ):
        assert step in commands, f"the README's runnable blocks lack {step!r}"


def test_the_parser_reads_fences_marks_and_indented_blocks() -> None:
    text = "\n".join(
        [
            "intro",
            "<!-- not run: needs a board -->",
            "",
            "```bash",
            "cat /sys/kernel/debug/rknpu/version",
            "```",
            "- a list item:",
            "",
            "  ```python",
            "  print('hi')",
            "  ```",
            "```console",
            "$ rkllm models",
            "NAME  KIND",
            "```",
            "```toml",
            "a = 1",
            "```",
        ]
    )
    board, listed, console, toml = parse_blocks(text)
    assert (board.lang, board.not_run, board.runs, board.line) == ("bash", "needs a board", False, 4)
    assert (listed.lang, listed.code, listed.runs) == ("python", "print('hi')\n", True)
    assert (console.script(), console.runs) == ("rkllm models", True)
    assert (toml.lang, toml.runs) == ("toml", False)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve() -> None:
    anchors = {
        page.name: {_anchor(h) for h in re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)}
        for page in PAGES
    }
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)(?:#([\w-]+))?\)", page.read_text(encoding="utf-8")):
            name = Path(target).name if target else page.name
            if target and not (page.parent / target).is_file():
                broken.append(f"{page.name}: {target} does not exist")
            elif anchor and name in anchors and anchor not in anchors[name]:
                broken.append(f"{page.name}: {target}#{anchor} names no heading")
    assert not broken, "\n".join(broken)


def test_the_readme_stays_a_landing_page_and_never_installs_from_pypi() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "README.md is the landing page: move the details to docs/"
    for page in PAGES:  # boardllm is not published on PyPI: installs are from a checkout
        hits = re.findall(r"pip install [\"']?boardllm\b", page.read_text(encoding="utf-8"))
        assert not hits, f"{page.name}: {hits}"
