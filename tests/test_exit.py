"""A process that ends in the middle of a stream exits at once and destroys every handle.

Each case is a child process that starts a long generation, takes a chunk or
two and then ends: mostly with the generator simply left suspended (neither
closed nor exhausted, no thread left to finish it), and also from a daemon
thread, through ``sys.exit`` and with an asyncio task still streaming. The
simulator writes its counters when the process unloads it
(``RKLLM_SIM_REPORT``), so the test sees every handle the child created,
including the ones destroyed during the interpreter's teardown.

Every case runs ``RKLLM_RACE_LOOPS`` times (default 20): an exit race that
breaks the promise in 1 run of 6 is caught with probability
1 - (5/6)**20 > 0.97; ``RKLLM_RACE_LOOPS=200`` makes a long hunt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_core.runtime.run import ABORT_WAIT_S
from rkllm_core.sim import make_model

LOOPS = int(os.environ.get("RKLLM_RACE_LOOPS", "20"))
ROOT = Path(__file__).resolve().parents[1]
QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
CHILD_TIMEOUT_S = 30.0  # a hang is a failure; a child that exits normally takes well under a second or two
assert CHILD_TIMEOUT_S < ABORT_WAIT_S  # so a child that waits out the abort wait is caught

PROMPT = "count to 3000"  # thousands of tokens at 1 ms each: still generating when the child ends

CHILDREN = {
    # The LangChain chat model's sync stream: ChatEngine.stream under it holds a session.
    "langchain": """
from langchain_rkllm import ChatRKLLM
chunks = ChatRKLLM(model="qwen3-0.6b").stream(PROMPT)
next(chunks), next(chunks)
""",
    # The core chat engine, a generator holding a lease and a session across its yields.
    "engine": """
from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
events = ChatEngine().stream("qwen3-0.6b", [ChatMessage("user", PROMPT)])
next(events), next(events)
""",
    # A one-shot runtime stream: it lets go of the handle when the run ends.
    "runtime": """
from rkllm_core.runtime import RKLLMRuntime
rt = RKLLMRuntime(MODEL)
chunks = rt.stream(PROMPT)
next(chunks), next(chunks)
""",
    # A stream inside a session the child entered and never left.
    "session": """
from rkllm_core.runtime import RKLLMRuntime
rt = RKLLMRuntime(MODEL)
session = rt.session().__enter__()
chunks = session.stream(PROMPT)
next(chunks), next(chunks)
""",
    # An async generator suspended on an event loop that is never closed.
    "async-engine": """
import asyncio
from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
loop = asyncio.new_event_loop()
events = ChatEngine().astream("qwen3-0.6b", [ChatMessage("user", PROMPT)])
loop.run_until_complete(events.__anext__())
loop.run_until_complete(events.__anext__())
""",
    # The runtime's own async stream, the same way.
    "async-runtime": """
import asyncio
from rkllm_core.runtime import RKLLMRuntime
rt = RKLLMRuntime(MODEL)
loop = asyncio.new_event_loop()
chunks = rt.astream(PROMPT)
loop.run_until_complete(chunks.__anext__())
loop.run_until_complete(chunks.__anext__())
""",
    # Already fine before suspended generators were: they must stay so.
    # A daemon thread in the middle of a chat-engine stream when the main thread ends.
    "daemon-thread": """
import threading
from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.errors import HandleClosedError
started = threading.Event()
def chat():
    try:
        for _event in ChatEngine().stream("qwen3-0.6b", [ChatMessage("user", PROMPT)]):
            started.set()
    except HandleClosedError:  # what a request that outlives the exit may meet
        pass
threading.Thread(target=chat, daemon=True).start()
started.wait(20)
""",
    # sys.exit from inside a for loop over a runtime stream.
    "sys-exit": """
import sys
from rkllm_core.runtime import RKLLMRuntime
rt = RKLLMRuntime(MODEL)
for n, _chunk in enumerate(rt.stream(PROMPT)):
    if n == 1:
        print('main returns', flush=True)
        sys.exit(0)
""",
    # asyncio.run returning while a task of its still streams (asyncio.run cancels it).
    "asyncio-task": """
import asyncio
from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
async def main():
    started = asyncio.Event()
    async def chat():
        async for _event in ChatEngine().astream("qwen3-0.6b", [ChatMessage("user", PROMPT)]):
            started.set()
    asyncio.get_running_loop().create_task(chat())
    await started.wait()
asyncio.run(main())
""",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("exit-models")
    make_model(d, QWEN)
    return d


def run_child(case: str, lib: Path, models: Path, report: Path) -> subprocess.CompletedProcess[str]:
    code = f"PROMPT = {PROMPT!r}\nMODEL = {str(models / QWEN)!r}\n{CHILDREN[case]}\nprint('main returns', flush=True)\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    env.update(
        RKLLM_LIB_PATH=str(lib),
        RKLLM_MODEL_DIR=str(models),
        RKLLM_SIM_REPORT=str(report),
        RKLLM_SIM_TOKEN_DELAY_MS="1",
        RKLLM_SIM_PREFILL_MS_PER_TOKEN="0",
        RKLLM_PROMPT_CACHE_DIR=str(report.parent / "pcache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{case}: the child did not exit within {CHILD_TIMEOUT_S:.0f} s\nstderr:\n{exc.stderr!r}")


# What happens at exit does not depend on the ABI: every case on 1.3, the plain runtime stream on 1.2 too.
CASES = [(case, "1.3") for case in CHILDREN] + [("runtime", "1.2")]


@pytest.mark.parametrize(("case", "abi"), CASES, ids=[f"{case}-{abi}" for case, abi in CASES])
def test_a_stream_suspended_at_exit_neither_hangs_nor_leaks(
    case: str, abi: str, sim_paths: dict[str, Path], models: Path, tmp_path: Path
) -> None:
    if case == "langchain":
        pytest.importorskip("langchain_core")
    for i in range(LOOPS):
        report = tmp_path / f"report-{i}.json"
        proc = run_child(case, sim_paths[abi], models, report)
        where = f"{case}, round {i}: exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert proc.returncode == 0 and "main returns" in proc.stdout, where
        assert "did not return" not in proc.stderr and "Traceback" not in proc.stderr, where
        counters = json.loads(report.read_text())  # written by the simulator as the process unloaded it
        assert counters["inits"] == 1 and counters["destroys"] == 1, (counters, where)
        assert counters["live_handles"] == 0 and counters["active_runs"] == 0, (counters, where)
        assert counters["aborts"] >= 1 and counters["generated_tokens"] < 2000, (counters, where)  # stopped early
        assert counters["destroy_while_running"] == 0 and counters["invalid_handle_calls"] == 0, (counters, where)
        assert counters["concurrent_run_violations"] == 0, (counters, where)
