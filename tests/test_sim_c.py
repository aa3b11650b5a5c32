"""Build the RKLLM simulator library for both ABIs and run the C test driver against each build.

The driver (tests/c/sim_driver.c) dlopen()s the library and calls every exported function through the
runtime's C ABI, printing one ``ok``/``FAIL`` line per check. Skipped only when no C compiler exists.
"""

from __future__ import annotations

import array
import ctypes
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rkllm_core.native import abi13
from rkllm_core.native.backend import RunRequest
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.structs import (
    LLMCallState,
    LLMHandle,
    LLMResultCallback,
    RKLLMInferMode,
    RKLLMPerfStat,
    RKLLMResult,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    field_offset,
)
from rkllm_core.sim import SimulatorControl, make_model

ROOT = Path(__file__).resolve().parents[1]
SIM_SRC = ROOT / "rkllm_core" / "sim" / "rkllm_sim.c"
DRIVER_SRC = ROOT / "tests" / "c" / "sim_driver.c"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]


def _find_cc() -> str | None:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


CC = _find_cc()

pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH"),
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="the simulator targets Linux (ELF, pthread, dlopen)"
    ),
]


def _build_all(cmds: list[list[str]]) -> None:
    """Run the compiler commands in parallel; fail with the compiler output if any fails."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    for cmd, proc in zip(cmds, procs, strict=False):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"build failed: {' '.join(cmd)}\n{out}{err}"


@pytest.mark.parametrize("abi", [12, 13])
def test_sim_driver(abi: int, tmp_path: Path) -> None:
    lib = tmp_path / f"libsim{abi}.so"
    driver = tmp_path / f"sim_driver{abi}"
    _build_all(
        [
            [CC, *CFLAGS, "-shared", "-fPIC", f"-DRKLLM_SIM_ABI={abi}", str(SIM_SRC), "-o", str(lib)],
            [CC, *CFLAGS, f"-DRKLLM_SIM_ABI={abi}", str(DRIVER_SRC), "-o", str(driver), "-ldl"],
        ]
    )
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([str(driver), str(lib), str(work)], capture_output=True, text=True, timeout=60)
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    report = f"exit {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    assert not failed, report
    assert run.returncode == 0, report
    assert f"0 failed (ABI {abi})" in run.stdout, report

    # Only the runtime's API and the simulator controls are exported.
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
        funcs = {
            parts[2]
            for parts in (line.split() for line in syms.stdout.splitlines())
            if len(parts) == 3 and parts[1] == "T"
        }
        assert funcs and all(name.startswith("rkllm_") for name in funcs), sorted(funcs)
        assert {"rkllm_init", "rkllm_run", "rkllm_sim_abi", "rkllm_sim_counter"} <= funcs


# --------------------------------------------------------------------------------------------------------
# The simulated embedding and reranker models, driven through ctypes with the binding's own structs.
# --------------------------------------------------------------------------------------------------------

SIM_VOCAB = 151936
NORMAL = int(LLMCallState.RKLLM_RUN_NORMAL)
FINISH = int(LLMCallState.RKLLM_RUN_FINISH)
ERROR = int(LLMCallState.RKLLM_RUN_ERROR)
HIDDEN = RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER
LOGITS = RKLLMInferMode.RKLLM_INFER_GET_LOGITS
_HIDDEN_OFFSET = field_offset(RKLLMResult, "last_hidden_layer")
_LOGITS_OFFSET = field_offset(RKLLMResult, "logits")
_PERF_OFFSET = field_offset(RKLLMResult, "perf")


@dataclass
class Capture:
    """What one run's callbacks delivered (buffers copied out during the callback)."""

    normal_return: int = 0
    states: list[int] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)
    embd_size: int = 0
    logits: list[float] | None = None
    logits_tokens: int = 0
    perf: RKLLMPerfStat | None = None
    failure: BaseException | None = None


_captures: dict[int, Capture] = {}
_capture_ids = itertools.count(1)


def _floats_at(address: int, count: int) -> list[float]:
    return array.array("f", ctypes.string_at(address, 4 * count)).tolist()


def _on_result(result: int | None, userdata: int | None, state: int) -> int:
    cap = _captures.get(userdata or 0)
    if cap is None or not result:
        return 0
    try:
        cap.states.append(state)
        if state == NORMAL:
            hidden = RKLLMResultLastHiddenLayer.from_address(result + _HIDDEN_OFFSET)
            address = ctypes.cast(hidden.hidden_states, ctypes.c_void_p).value
            if address and hidden.num_tokens and hidden.embd_size:
                flat = _floats_at(address, hidden.num_tokens * hidden.embd_size)
                size = cap.embd_size = hidden.embd_size
                cap.rows = [flat[i * size : (i + 1) * size] for i in range(hidden.num_tokens)]
            logits = RKLLMResultLogits.from_address(result + _LOGITS_OFFSET)
            address = ctypes.cast(logits.logits, ctypes.c_void_p).value
            if address and logits.num_tokens and logits.vocab_size:
                cap.logits = _floats_at(address + 4 * (logits.num_tokens - 1) * logits.vocab_size, logits.vocab_size)
                cap.logits_tokens = logits.num_tokens
            return cap.normal_return
        if state == FINISH:
            cap.perf = RKLLMPerfStat.from_buffer_copy(
                ctypes.string_at(result + _PERF_OFFSET, ctypes.sizeof(RKLLMPerfStat))
            )
    except BaseException as exc:  # never raise into native code
        cap.failure = exc
    return 0


_CALLBACK = LLMResultCallback(_on_result)


class Session:
    """One runtime handle whose result callback is :func:`_on_result`."""

    def __init__(self, lib: RuntimeLibrary, model: Path, ctx: int = 2048) -> None:
        self.lib, self.backend = lib, lib.backend
        param = self.backend.default_param()
        param.model_path = os.fsencode(model)
        param.max_context_len = ctx
        handle = LLMHandle()
        if lib.abi == "1.3":
            cb = abi13.RKLLMCallback()
            cb.result_callback = _CALLBACK
            self.rc = lib.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(cb))
            self._keep: tuple[object, ...] = (param, cb)
        else:
            self.rc = lib.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), _CALLBACK)
            self._keep = (param,)
        self.handle = int(handle.value or 0)

    def template(self, system: str, prefix: str, postfix: str) -> None:
        assert self.backend.set_chat_template(self.handle, system.encode(), prefix.encode(), postfix.encode()) == 0

    def run(
        self,
        mode: RKLLMInferMode,
        text: str | None = None,
        ids: tuple[int, ...] | None = None,
        *,
        keep_history: bool = False,
        normal_return: int = 0,
    ) -> Capture:
        req = RunRequest(
            role=b"user",
            prompt=text.encode() if text is not None else None,
            token_ids=ids,
            enable_thinking=False,
            keep_history=keep_history,
            sampling=None,
            max_new_tokens=None,
            lora=None,
            save_prompt_cache=None,
            mode=mode,
        )
        inp, infer, keep = self.backend.run_structs(req)
        run_id = next(_capture_ids)
        cap = _captures[run_id] = Capture(normal_return=normal_return)
        try:
            rc = self.backend.run(self.handle, inp, infer, run_id)
        finally:
            del _captures[run_id]
        del keep
        assert cap.failure is None, cap.failure
        assert rc == 0 and cap.states == [NORMAL, FINISH], (rc, cap.states)
        return cap

    def embed(self, text: str) -> list[float]:
        return self.run(HIDDEN, text).rows[-1]

    def kv_size(self) -> int:
        rc, size = self.backend.kv_cache_size(self.handle, 1)
        assert rc == 0
        return size

    def close(self) -> None:
        if self.handle:
            assert self.backend.destroy(self.handle) == 0
            self.handle = 0


@pytest.fixture
def session(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path) -> Iterator[Callable[..., Session]]:
    made: list[Session] = []

    def open_session(model: Path | None = None, *, raw: bool = True) -> Session:
        s = Session(sim_lib, model or make_model(model_dir))
        assert s.rc == 0
        made.append(s)
        if raw:
            s.template("", "", "")  # no wrapping: the prefill is exactly the text
        return s

    yield open_session
    for s in made:
        s.close()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def sim_tokens(text: str) -> int:
    """The simulator's token count of ``text`` (see tok_next() in rkllm_sim.c)."""
    data, i, count = text.encode(), 0, 0
    special = re.compile(rb"<\|[A-Za-z0-9_]{1,64}\|>")
    alnum = re.compile(rb" ?[A-Za-z0-9]{1,4}")
    while i < len(data):
        m = special.match(data, i) or alnum.match(data, i)
        if m:
            i = m.end()
        else:
            i += 1
            while i < len(data) and data[i] & 0xC0 == 0x80:
                i += 1
        count += 1
    return count


def test_hidden_states_rows_and_flow(session: Callable[..., Session], sim: SimulatorControl) -> None:
    s = session()
    text = "the cat sat on the mat"
    sim.set("trace", 2)
    cap = s.run(HIDDEN, text)
    assert cap.embd_size == 256 and len(cap.rows) == sim_tokens(text) == cap.perf.prefill_tokens == 6
    assert all(abs(math.fsum(x * x for x in row) - 1.0) < 1e-5 for row in cap.rows)
    assert [t["context"] for t in sim.trace() if t["fn"] == "prefilled"] == [text]  # empty template: no wrapping
    assert sim.counter("runs") == 1 and sim.counter("prefilled_tokens") == 6 and s.kv_size() == 0
    # Row t covers the words complete within the first t+1 tokens ("the", " cat", " sat", ...).
    assert cosine(cap.rows[1], s.embed("the cat")) > 0.9999
    assert cosine(cap.rows[1], cap.rows[0]) < 0.9
    # keep_history keeps the prefill in the KV cache; the next turn's rows are that turn's tokens.
    assert len(s.run(HIDDEN, "hello", keep_history=True).rows) == 2 and s.kv_size() == 2
    assert len(s.run(HIDDEN, "world again").rows) == sim_tokens("world again") == 4 and s.kv_size() == 0


def test_hidden_states_are_bag_of_words(session: Callable[..., Session]) -> None:
    s, other = session(), session()
    a = s.embed("the cat sat on the mat")
    assert cosine(a, other.embed("the cat sat on the mat")) > 0.9999
    assert cosine(a, s.embed("The CAT sat on the mat!")) > 0.9999  # case and punctuation are not words
    assert cosine(a, s.embed("on the mat the cat sat")) > 0.9999  # order does not matter
    related, unrelated = cosine(a, s.embed("a cat on a mat")), cosine(a, s.embed("stock markets fell sharply"))
    assert related > unrelated + 0.3, (related, unrelated)
    # Longer texts: shared words dominate.
    q = s.embed("how do plants make energy from sunlight")
    on_topic = s.embed("Plants make energy from sunlight by photosynthesis in their leaves.")
    off_topic = s.embed("The train to Berlin leaves at nine and arrives late in the evening.")
    assert cosine(q, on_topic) > cosine(q, off_topic) + 0.3
    # UTF-8 letters are part of words.
    assert cosine(s.embed("café crème"), s.embed("CAFÉ crème")) < 0.9999  # only ASCII is case-folded
    assert cosine(s.embed("café crème"), s.embed("crème café")) > 0.9999
    assert cosine(s.embed("café"), s.embed("caf")) < 0.5


def test_hidden_states_of_token_input(session: Callable[..., Session]) -> None:
    s = session()
    cap = s.run(HIDDEN, ids=(101, 202, 303))
    assert len(cap.rows) == 3 == cap.perf.prefill_tokens and cap.embd_size == 256
    assert max(cosine(x, y) for x, y in itertools.combinations(cap.rows, 2)) < 0.9  # ids differ -> rows differ
    assert cosine(cap.rows[0], s.run(HIDDEN, ids=(101,)).rows[0]) > 0.9999
    assert cosine(cap.rows[0], s.run(HIDDEN, ids=(102,)).rows[0]) < 0.5
    assert cosine(cap.rows[-1], s.run(HIDDEN, ids=(303, 101, 202)).rows[-1]) > 0.9999
    assert cosine(cap.rows[-1], s.run(HIDDEN, ids=(404, 505, 606)).rows[-1]) < 0.5
    assert s.kv_size() == 0


def test_hidden_states_follow_the_chat_template(session: Callable[..., Session], sim: SimulatorControl) -> None:
    raw, wrapped, default = session(), session(raw=False), session(raw=False)
    wrapped.template("SYS", "PRE", "POST")
    text = "the cat sat on the mat"
    plain = raw.run(HIDDEN, text)
    assert len(plain.rows) == sim_tokens(text)
    sim.set("trace", 2)
    w = wrapped.run(HIDDEN, text)
    assert [t["context"] for t in sim.trace() if t["fn"] == "prefilled"] == ["SYSPRE" + text + "POST"]
    assert len(w.rows) == sim_tokens("SYSPRE" + text + "POST") > len(plain.rows)
    assert cosine(w.rows[-1], plain.rows[-1]) < 0.9
    assert w.rows == raw.run(HIDDEN, "SYSPRE" + text + "POST").rows  # the template is plain text before/after
    # The default (Qwen) template: its special tokens are single tokens and not words.
    d = default.run(HIDDEN, text)
    qwen = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + text
        + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert d.rows == raw.run(HIDDEN, qwen).rows and len(d.rows) == sim_tokens(qwen)
    special = raw.run(HIDDEN, "<|im_start|>" + text + "<|im_end|><|endoftext|>")
    assert len(special.rows) == len(plain.rows) + 3
    assert cosine(special.rows[-1], plain.rows[-1]) > 0.9999


def test_hidden_states_pacing_and_early_release(session: Callable[..., Session], sim: SimulatorControl) -> None:
    s = session()
    text = "one two three four five six seven eight nine ten"
    sim.set("prefill_ms_per_token", 5)
    t0 = time.monotonic()
    cap = s.run(HIDDEN, text)
    assert time.monotonic() - t0 >= 0.9 * 5e-3 * len(cap.rows) and cap.perf.prefill_time_ms >= 0.9 * 5 * len(cap.rows)
    sim.set("prefill_ms_per_token", 0)
    # 1.3: a callback returning 2 releases the buffer early; the run goes on to FINISH.
    again = s.run(HIDDEN, text, normal_return=2)
    assert again.rows == cap.rows and sim.counter("pauses") == 0 and sim.counter("runs") == 2
    assert s.run(LOGITS, text, normal_return=2).logits is not None


RERANK_SYSTEM = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCT = "Given a web search query, retrieve relevant passages that answer the query"
YES, NO = 9693, 2152


def rerank_prompt(query: str, document: str) -> str:
    return f"<Instruct>: {INSTRUCT}\n<Query>: {query}\n<Document>: {document}"


def p_yes(logits: list[float]) -> float:
    return 1.0 / (1.0 + math.exp(logits[NO] - logits[YES]))


def test_reranker_logits(session: Callable[..., Session], model_dir: Path) -> None:
    model = make_model(model_dir, "Qwen3-Reranker-0.6B-w8a8-rk3588.rkllm", yes_token=YES, no_token=NO)
    raw = session(model)
    templated = session(model, raw=False)
    templated.template(RERANK_SYSTEM, "", RERANK_SUFFIX)
    query = "What is the capital of France?"
    relevant = "Paris is the capital and largest city of France."
    unrelated = "Photosynthesis converts light energy into chemical energy in plants."
    partial = "France is a country in Western Europe."
    scores = {}
    for name, doc in [("relevant", relevant), ("unrelated", unrelated), ("partial", partial)]:
        cap = raw.run(LOGITS, RERANK_SYSTEM + rerank_prompt(query, doc) + RERANK_SUFFIX)
        assert cap.logits_tokens == 1 and len(cap.logits) == SIM_VOCAB
        assert [i for i, v in enumerate(cap.logits) if v != 0 and i not in (YES, NO)] == []
        assert cap.logits[NO] == -cap.logits[YES]
        scores[name] = p_yes(cap.logits)
        assert p_yes(templated.run(LOGITS, rerank_prompt(query, doc)).logits) == scores[name]
    assert scores["relevant"] > 0.5 > scores["unrelated"]
    assert scores["relevant"] > scores["partial"] > scores["unrelated"]
    # overlap = shared distinct query words / distinct query words, function words aside: 2/2
    # ("capital", "france"), then 0; "partial" has one of the two.
    assert math.isclose(raw.run(LOGITS, rerank_prompt(query, relevant)).logits[YES], 8 * 2 / 2 - 4, rel_tol=1e-6)
    assert math.isclose(raw.run(LOGITS, rerank_prompt(query, partial)).logits[YES], 8 * 1 / 2 - 4, abs_tol=1e-6)
    assert raw.run(LOGITS, rerank_prompt(query, unrelated)).logits[YES] == -4.0
    assert raw.run(LOGITS, "no query here").logits[YES] == -4.0
    # The last <Query>/<Document> count, and the document ends at the next special token.
    two = rerank_prompt("old question about plants", unrelated) + "\n" + rerank_prompt(query, relevant)
    assert p_yes(raw.run(LOGITS, two).logits) == scores["relevant"]
    cut = rerank_prompt(query, "Nothing here.<|im_end|> Paris is the capital of France")
    assert p_yes(raw.run(LOGITS, cut).logits) < 0.5
    # Hidden states of a reranker model are the same bag-of-words embedding.
    assert len(raw.run(HIDDEN, query).rows) == sim_tokens(query)


def fnv1a32(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def test_logits_without_reranker_keys(session: Callable[..., Session], sim: SimulatorControl) -> None:
    s = session()
    cap = s.run(LOGITS, rerank_prompt("What is the capital of France?", "Paris is the capital of France."))
    assert cap.logits_tokens == 1 and len(cap.logits) == SIM_VOCAB
    nonzero = {i: v for i, v in enumerate(cap.logits) if v != 0}
    assert nonzero == {fnv1a32(b"Echo") % SIM_VOCAB: 10.0}  # the reply's first token ("Echo: ...")
    assert s.kv_size() == 0 and sim.counter("runs") == 1


def test_reranker_model_keys(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> None:
    with pytest.raises(ValueError):
        make_model(model_dir, "half.rkllm", yes_token=1)
    assert "yes_token=7\nno_token=8\n" in make_model(model_dir, "r.rkllm", yes_token=7, no_token=8).read_text()
    for name, yes, no in [("same.rkllm", 5, 5), ("range.rkllm", 1, SIM_VOCAB)]:
        bad = Session(sim_lib, make_model(model_dir, name, yes_token=yes, no_token=no))
        assert bad.rc != 0 and bad.handle == 0
    assert sim.counter("init_failures") == 2
