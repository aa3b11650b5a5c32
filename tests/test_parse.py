"""The incremental text pipeline: stop sequences, reasoning split, tool-call parsing."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from rkllm_core.chat.parse import (
    MAX_STOP_SEQUENCES,
    Event,
    InvalidToolCall,
    ReasoningDelta,
    StopHit,
    StopSequenceFilter,
    StreamClosedError,
    StreamPipeline,
    TextDelta,
    ThinkSplitter,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
)
from rkllm_core.errors import InvalidParameterError, RKLLMError

# --------------------------------------------------------------------------- helpers


def chunkings(s: str, *, n_random: int = 25, three_way_max: int = 48, seed: int = 1234) -> Iterator[list[str]]:
    """Every way we chunk a sample: whole, per character, every 2-split, 3-splits, random sizes."""
    yield [s]
    yield list(s)
    for i in range(1, len(s)):
        yield [s[:i], s[i:]]
    if len(s) <= three_way_max:
        for i, j in itertools.combinations(range(1, len(s)), 2):
            yield [s[:i], s[i:j], s[j:]]
    rng = random.Random(seed + len(s))
    for _ in range(n_random):
        pieces, pos = [], 0
        while pos < len(s):
            n = rng.randint(0, 9)  # empty chunks too
            pieces.append(s[pos : pos + n])
            pos += n
        yield pieces


def normalize(events: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Merge adjacent deltas of one kind so outputs of different chunkings compare equal."""
    out: list[tuple[Any, ...]] = []
    for ev in events:
        if isinstance(ev, TextDelta | ReasoningDelta):
            assert ev.text, f"empty delta {ev!r}"
            kind = type(ev).__name__
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + ev.text)
            else:
                out.append((kind, ev.text))
        elif isinstance(ev, ToolCallDelta):
            if out and out[-1][0] == "ToolCallDelta" and out[-1][1] == ev.index:
                assert ev.id is None and ev.name is None, "id/name only on the first delta of a call"
                _, index, id_, name, args = out[-1]
                out[-1] = ("ToolCallDelta", index, id_, name, args + ev.arguments_delta)
            else:
                assert ev.id is not None and ev.name is not None, "first delta of a call carries id and name"
                out.append(("ToolCallDelta", ev.index, ev.id, ev.name, ev.arguments_delta))
        else:
            out.append(("event", ev))
    return out


def counter_ids() -> Callable[[], str]:
    it = itertools.count()
    return lambda: f"call_{next(it)}"


def run_stop(stops: Sequence[str], chunks: Sequence[str]) -> tuple[str, str | None]:
    f = StopSequenceFilter(stops)
    out = "".join(f.feed(c) for c in chunks) + f.flush()
    return out, f.hit


def run_think(chunks: Sequence[str], enabled: bool = True, start_in_think: bool = False) -> list[tuple[Any, ...]]:
    t = ThinkSplitter(enabled, start_in_think=start_in_think)
    events: list[Any] = []
    for c in chunks:
        events += t.feed(c)
    events += t.flush()
    return normalize(events)


def run_tools(chunks: Sequence[str]) -> list[tuple[Any, ...]]:
    p = ToolCallParser(id_factory=counter_ids())
    events: list[Any] = []
    for c in chunks:
        events += p.feed(c)
    events += p.flush()
    return normalize(events)


def run_pipeline(chunks: Sequence[str], **kwargs: Any) -> tuple[list[tuple[Any, ...]], StreamPipeline]:
    p = StreamPipeline(id_factory=counter_ids(), **kwargs)
    events: list[Event] = []
    for c in chunks:
        events += p.feed(c)
    events += p.flush()
    return normalize(events), p


def reference_stop(s: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """The stop that completes first (earliest end, then earliest start) cuts the text."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        i = s.find(stop)
        if i >= 0 and (best is None or (i + len(stop), i) < best[:2]):
            best = (i + len(stop), i, stop)
    if best is None:
        return s, None
    return s[: best[1]], best[2]


# --------------------------------------------------------------------------- stop sequences


STOP_CASES: list[tuple[str, list[str]]] = [
    ("Hello world\n\nUser: more", ["\n\nUser:"]),
    ("Hello world\n\nUse", ["\n\nUser:"]),
    ("xxab", ["ab", "b"]),
    ("xxb", ["ab", "b"]),
    ("STOPrest", ["STOP"]),
    ("abcd", ["abcd", "c"]),
    ("say abcde now", ["abc", "abcde"]),
    ("aaab", ["aab", "aa"]),
    ("nothing here", ["zz", "yy"]),
    ("<|im_end|>tail", ["<|im_end|>", "<|endoftext|>"]),
]


@pytest.mark.parametrize(("sample", "stops"), STOP_CASES)
def test_stop_every_chunking_matches_one_shot_and_reference(sample: str, stops: list[str]) -> None:
    expected = reference_stop(sample, stops)
    assert run_stop(stops, [sample]) == expected
    for chunks in chunkings(sample):
        assert run_stop(stops, chunks) == expected, chunks


def test_stop_overlapping_prefers_the_one_complete_first() -> None:
    assert run_stop(["ab", "b"], ["xxab"]) == ("xx", "ab")  # same end: the longer one
    assert run_stop(["abcd", "c"], ["abcd"]) == ("ab", "c")  # "c" completes before "abcd"
    # a stop that is a prefix of another: the short one completes first
    assert run_stop(["abc", "abcde"], ["abcde"]) == ("", "abc")


def test_stop_at_the_very_start() -> None:
    f = StopSequenceFilter(["<|im_end|>"])
    assert f.feed("<|im_") == ""
    assert f.feed("end|>more") == ""
    assert f.hit == "<|im_end|>"
    assert f.feed("anything") == ""
    assert f.flush() == ""


def test_stop_discards_everything_after_the_match() -> None:
    f = StopSequenceFilter(["END"])
    assert f.feed("one EN") == "one "
    assert f.feed("D two") == ""
    assert f.hit == "END"
    assert f.feed(" three") == ""
    assert f.flush() == ""


def test_stop_holds_back_only_real_prefixes() -> None:
    f = StopSequenceFilter(["\n\nUser:"])
    assert f.feed("hello") == "hello"  # no possible prefix: nothing held
    assert f.feed(" a\n") == " a"
    assert f.feed("\nUs") == ""
    assert f.feed("e ok") == "\n\nUse ok"  # it was not the stop after all
    assert f.feed("\n\nUs") == ""
    assert f.flush() == "\n\nUs"  # released at the end of the stream
    assert f.hit is None


def test_stop_single_character_and_no_stops() -> None:
    f = StopSequenceFilter(["."])
    assert f.feed("abc") == "abc"
    assert f.feed("d.e") == "d"
    assert f.hit == "."
    g = StopSequenceFilter([])
    assert g.feed("a<b") == "a<b"
    assert g.flush() == ""


def test_stop_fuzz_against_reference() -> None:
    rng = random.Random(7)
    stop_sets = [["ab", "b"], ["abc", "bc", "c"], ["aa", "aab"], ["abab"], ["ba", "aab", "bbb"]]
    for _ in range(400):
        stops = rng.choice(stop_sets)
        s = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        expected = reference_stop(s, stops)
        for chunks in itertools.islice(chunkings(s, n_random=3, three_way_max=0), 40):
            assert run_stop(stops, chunks) == expected, (s, stops, chunks)


@pytest.mark.parametrize(
    "stops",
    [[""], ["ok", ""], "abc", [1], [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]],
    ids=["empty", "one-empty", "bare-string", "not-str", "too-many"],
)
def test_stop_validation(stops: Any) -> None:
    with pytest.raises(InvalidParameterError):
        StopSequenceFilter(stops)


def test_stop_accepts_the_maximum_and_dedupes() -> None:
    f = StopSequenceFilter([f"s{i}" for i in range(MAX_STOP_SEQUENCES)])
    assert len(f.stops) == MAX_STOP_SEQUENCES
    assert StopSequenceFilter(["a", "a", "b"]).stops == ("a", "b")
    assert issubclass(InvalidParameterError, ValueError)


def test_stop_work_is_linear() -> None:
    stops = ["\n\nUser:", "<|im_end|>", "###"]
    f = StopSequenceFilter(stops)
    text = ("Some text, <b>tags</b> and #hash\nlines\n" * 300)[:10_000]
    out = "".join(f.feed(c) for c in text) + f.flush()
    assert out == text
    max_len = max(map(len, stops))
    # per one-character feed: each stop searched over at most max_len chars, plus the hold-back tail
    assert f.chars_scanned <= len(text) * (len(stops) + 2) * max_len
    assert f.chars_scanned < len(text) ** 2 / 50  # nowhere near re-scanning everything


# --------------------------------------------------------------------------- think


THINK_SAMPLE = "<think>\nLet me see: 2<3, a </thin b.\n</think>\n\nThe answer is <think> 4."


def test_think_every_chunking() -> None:
    expected = [("ReasoningDelta", "Let me see: 2<3, a </thin b.\n"), ("TextDelta", "The answer is <think> 4.")]
    for chunks in chunkings(THINK_SAMPLE, three_way_max=80):
        assert run_think(chunks) == expected, chunks


def test_think_tags_split_across_chunks() -> None:
    t = ThinkSplitter(True)
    assert t.feed("<th") == []
    assert t.feed("ink>abc<") == [ReasoningDelta("abc")]  # only the possible tag is held back
    assert t.feed("x</thi") == [ReasoningDelta("<x")]
    assert t.feed("nk>\n") == []
    assert t.feed("\nHi") == [TextDelta("Hi")]
    assert t.feed(" <think>") == [TextDelta(" <think>")]  # answer text passes through untouched
    assert t.flush() == []


def test_think_enabled_without_think_block() -> None:
    for sample in ["Hello <think>x</think>", "  <thinking about it", "<b>bold</b>", "\n\nHi"]:
        for chunks in chunkings(sample):
            assert run_think(chunks) == [("TextDelta", sample)], chunks


def test_think_unclosed_is_reasoning() -> None:
    sample = "<think>\nstill thinking </thi"
    for chunks in chunkings(sample):
        assert run_think(chunks) == [("ReasoningDelta", "still thinking </thi")], chunks
    assert run_think(["<thi"]) == [("TextDelta", "<thi")]  # not even a full tag: text


def test_think_disabled_drops_empty_block() -> None:
    sample = "\n<think>\n\n</think>\n\nHello <think></think> there"
    for chunks in chunkings(sample, three_way_max=60):
        assert run_think(chunks, enabled=False) == [("TextDelta", "Hello <think></think> there")], chunks


def test_think_disabled_keeps_everything_else() -> None:
    for sample in ["<think>real</think>answer", "Hello", "<thinker>", "  indented", "<think>\n\n</thin"]:
        for chunks in chunkings(sample):
            assert run_think(chunks, enabled=False) == [("TextDelta", sample)], chunks
    assert run_think(["<think></think>"], enabled=False) == []


def test_think_start_in_think() -> None:
    expected = [("ReasoningDelta", "I think so."), ("TextDelta", "Yes.")]
    for sample in ["I think so.</think>\n\nYes.", "\n<think>\nI think so.</think>Yes."]:
        for chunks in chunkings(sample):
            assert run_think(chunks, start_in_think=True) == expected, chunks
    assert run_think(["</think>\n\nYes."], start_in_think=True) == [("TextDelta", "Yes.")]
    assert run_think(["<thi"], start_in_think=True) == [("ReasoningDelta", "<thi")]
    # ignored when thinking is disabled
    assert run_think(["a</think>b"], enabled=False, start_in_think=True) == [("TextDelta", "a</think>b")]


def test_think_empty_reasoning_emits_nothing() -> None:
    assert run_think(["<think>\n\n</think>\n\nOK"]) == [("TextDelta", "OK")]


# --------------------------------------------------------------------------- tool calls


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "q": {"s": "}\\"{"}}}\n</tool_call>'
CALL_ARGS = {"city": "Paris", "q": {"s": '}"{'}}


def check_call_events(events: list[tuple[Any, ...]], index: int, name: str, args: dict[str, Any]) -> None:
    delta = [e for e in events if e[0] == "ToolCallDelta" and e[1] == index]
    calls = [e[1] for e in events if e[0] == "event" and isinstance(e[1], ToolCall) and e[1].index == index]
    assert len(delta) == 1 and len(calls) == 1, events
    _, _, id_, dname, dargs = delta[0]
    assert (id_, dname) == (calls[0].id, name)
    assert json.loads(dargs) == args
    assert calls[0].name == name and calls[0].arguments == args


def test_tool_call_every_chunking() -> None:
    one_shot = run_tools([CALL])
    check_call_events(one_shot, 0, "get_weather", CALL_ARGS)
    assert one_shot[0][4] == json.dumps(CALL_ARGS)  # streamed raw: exactly the object's text
    for chunks in chunkings(CALL, three_way_max=len(CALL)):
        assert run_tools(chunks) == one_shot, chunks


def test_tool_call_streams_name_before_the_block_closes() -> None:
    p = ToolCallParser(id_factory=lambda: "call_x")
    assert p.feed('<tool_call>\n{"name": "f", "arg') == []
    assert p.feed('uments": {"a"') == [ToolCallDelta(0, "call_x", "f", '{"a"')]
    assert p.feed(": 1}}\n</tool_") == [ToolCallDelta(0, None, None, ": 1}")]
    events = p.feed("call>")
    assert events == [ToolCall("call_x", "f", {"a": 1}, '{"name": "f", "arguments": {"a": 1}}', 0)]
    assert p.flush() == []


def test_two_tool_calls_and_text_around() -> None:
    sample = (
        "Let me check.\n\n<tool_call>\n"
        '{"name": "a", "arguments": {}}\n</tool_call>\n \n<tool_call>\n'
        '{"parameters": {"x": [1, {"y": null}]}, "name": "b"}\n</tool_call>\n\nDone. \n'
    )
    expected = run_tools([sample])
    assert expected[0] == ("TextDelta", "Let me check.")  # trailing whitespace before a call dropped
    assert expected[-1] == ("TextDelta", "Done. \n")  # leading whitespace after a call dropped
    assert [e[0] for e in expected] == ["TextDelta", "ToolCallDelta", "event", "ToolCallDelta", "event", "TextDelta"]
    check_call_events(expected, 0, "a", {})
    check_call_events(expected, 1, "b", {"x": [1, {"y": None}]})
    assert [e[1].id for e in expected if e[0] == "event"] == ["call_0", "call_1"]
    for chunks in chunkings(sample, n_random=60, three_way_max=0):
        assert run_tools(chunks) == expected, chunks


def test_whitespace_only_text_around_calls_is_dropped() -> None:
    sample = '\n\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n\n'
    for chunks in chunkings(sample):
        events = run_tools(chunks)
        assert [e[0] for e in events] == ["ToolCallDelta", "event"], chunks


@pytest.mark.parametrize(
    ("body", "args"),
    [
        ('{"name": "f", "arguments": "{\\"q\\": \\"x\\"}"}', {"q": "x"}),
        ('{"name": "f", "parameters": {"q": 1}}', {"q": 1}),
        ('{"arguments": {"q": 1}, "name": "f"}', {"q": 1}),
        ('{"name": "f"}', {}),
        ('{"name": "f", "arguments": null}', {}),
        ('{"name": "f", "arguments": ""}', {}),
        ('{"type": "function", "function": {"name": "f", "arguments": "{\\"q\\": 2}"}}', {"q": 2}),
        ('```json\n{"name": "f", "arguments": {"q": 3}}\n```', {"q": 3}),
        (
            '{"name": "f", "arguments": {"p": "C:\\\\dir\\\\", "b": "{{\\"", "c": {}}}',
            {"p": "C:\\dir\\", "b": '{{"', "c": {}},
        ),
        (" " * 600 + '{"name": "f", "arguments": {"q": 4}}', {"q": 4}),
    ],
    ids=[
        "args-string",
        "parameters",
        "args-first",
        "no-args",
        "null-args",
        "empty-string",
        "openai-shape",
        "fence",
        "escapes",
        "name-late",
    ],
)
def test_tool_call_argument_forms(body: str, args: dict[str, Any]) -> None:
    sample = f"<tool_call>\n{body}\n</tool_call>"
    expected = run_tools([sample])
    check_call_events(expected, 0, "f", args)
    for chunks in chunkings(sample, three_way_max=0):
        assert run_tools(chunks) == expected, chunks


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('{"name": "f", "arguments": {"a": 1}', "not valid JSON"),
        ('{"arguments": {"a": 1}}', 'no "name"'),
        ('{"name": "", "arguments": {}}', 'no "name"'),
        ('{"name": "f", "arguments": [1, 2]}', "must be a JSON object, got list"),
        ('{"name": "f", "arguments": "{nope"}', "string that is not valid JSON"),
        ('{"name": "f", "arguments": "[1]"}', "must be a JSON object, got list"),
        ("[1, 2]", "must be a JSON object, got list"),
        ("", "empty tool call"),
        ("get_weather(city='Paris')", "not valid JSON"),
    ],
)
def test_malformed_tool_call_is_reported_not_raised(body: str, error: str) -> None:
    sample = f"<tool_call>\n{body}\n</tool_call>after"
    for chunks in chunkings(sample, n_random=5, three_way_max=0):
        events = run_tools(chunks)
        invalid = [e[1] for e in events if e[0] == "event"]
        assert len(invalid) == 1 and isinstance(invalid[0], InvalidToolCall), events
        assert error in invalid[0].error
        assert invalid[0].raw == body.strip()
        assert invalid[0].id == "call_0"
        assert events[-1] == ("TextDelta", "after")


def test_malformed_after_name_was_streamed_keeps_id_and_name() -> None:
    p = ToolCallParser(id_factory=lambda: "call_x")
    events = p.feed('<tool_call>{"name": "f", "arguments": {"a": 1}, oops}</tool_call>')
    assert events[0] == ToolCallDelta(0, "call_x", "f", '{"a": 1}')
    assert isinstance(events[1], InvalidToolCall)
    assert (events[1].id, events[1].name, events[1].index) == ("call_x", "f", 0)


def test_unclosed_tool_call_at_flush_is_invalid() -> None:
    sample = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_'
    for chunks in chunkings(sample, three_way_max=0):
        events = run_tools(chunks)
        last = events[-1][1]
        assert isinstance(last, InvalidToolCall) and "unterminated" in last.error, events
        assert last.raw == sample[len("<tool_call>") :].strip()


def test_default_ids_and_plain_text() -> None:
    p = ToolCallParser()
    events = p.feed('<tool_call>{"name": "f", "arguments": {}}</tool_call>') + p.flush()
    call = events[-1]
    assert isinstance(call, ToolCall)
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    for sample in ["a < b <tool", "x </tool_call> y", "trailing\n\n", "<tool_cal>"]:
        for chunks in chunkings(sample):
            assert run_tools(chunks) == [("TextDelta", sample)], chunks


# --------------------------------------------------------------------------- pipeline


PIPE_SAMPLE = (
    "<think>\nUse the tool. <tool_call> here is reasoning\n</think>\n\nChecking.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    "<|im_end|>ignored <tool_call>"
)


def test_pipeline_stop_think_tools_every_chunking() -> None:
    expected, p = run_pipeline([PIPE_SAMPLE], stops=["<|im_end|>"], enable_thinking=True, parse_tools=True)
    assert expected[0] == ("ReasoningDelta", "Use the tool. <tool_call> here is reasoning\n")
    assert expected[1] == ("TextDelta", "Checking.")
    check_call_events(expected, 0, "get_weather", {"city": "Oslo"})
    assert expected[-1] == ("event", StopHit("<|im_end|>"))
    assert p.stopped and p.stop_hit == "<|im_end|>"
    assert p.text == "Checking."
    assert p.reasoning == "Use the tool. <tool_call> here is reasoning\n"
    assert [c.name for c in p.tool_calls] == ["get_weather"]
    assert p.invalid_tool_calls == []
    for chunks in chunkings(PIPE_SAMPLE, n_random=80, three_way_max=0):
        got, q = run_pipeline(chunks, stops=["<|im_end|>"], enable_thinking=True, parse_tools=True)
        assert got == expected, chunks
        assert (q.text, q.reasoning, q.stop_hit) == (p.text, p.reasoning, p.stop_hit)


def test_pipeline_stop_inside_reasoning_stops() -> None:
    events, p = run_pipeline(["<think>a STOP b</think>answer"], stops=["STOP"], enable_thinking=True)
    assert events == [("ReasoningDelta", "a "), ("event", StopHit("STOP"))]
    assert p.stopped and p.text == ""


def test_pipeline_stop_inside_tool_call_makes_it_invalid() -> None:
    events, p = run_pipeline(['<tool_call>{"name": "f", "argumeSTOP'], stops=["STOP"], parse_tools=True)
    assert isinstance(events[-2][1], InvalidToolCall)
    assert events[-1] == ("event", StopHit("STOP"))
    assert len(p.invalid_tool_calls) == 1


def test_pipeline_after_stop_and_after_flush() -> None:
    p = StreamPipeline(stops=["END"])
    assert p.feed("abcEN") == [TextDelta("abc")]
    assert p.feed("D more") == [StopHit("END")]
    assert p.feed("late text") == []  # produced before the abort took effect
    assert p.flush() == []
    with pytest.raises(StreamClosedError):
        p.feed("x")
    assert issubclass(StreamClosedError, RKLLMError)
    q = StreamPipeline()
    assert q.feed("hi") == [TextDelta("hi")]
    assert q.flush() == []
    assert q.flush() == []
    assert (q.text, q.stopped, q.stop_hit) == ("hi", False, None)


def test_pipeline_plain_and_defaults() -> None:
    events, p = run_pipeline(["<think>\n\n</think>\n\n", "Hello", " <tool_call>x"], stops=None)
    assert events == [("TextDelta", "Hello <tool_call>x")]  # thinking and tools off
    assert p.tool_calls == [] and p.reasoning == ""


def test_pipeline_invalid_stops() -> None:
    with pytest.raises(InvalidParameterError):
        StreamPipeline(stops=[""])


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stops": ["\n\nUser:", "<|im_end|>"], "enable_thinking": True, "parse_tools": True}],
    ids=["bare", "everything"],
)
def test_pipeline_ten_thousand_single_characters_is_linear(kwargs: dict[str, Any]) -> None:
    unit = "Plain text with < and <b> and a\nnewline, #tags, </think> and </tool_call> mentions. "
    text = ("<think>reason</think>" if kwargs else "") + (unit * 200)[:10_000]
    p = StreamPipeline(**kwargs)
    events: list[Event] = []
    for c in text:
        events += p.feed(c)
    events += p.flush()
    expected = (unit * 200)[:10_000]
    assert p.text == expected
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == expected
    # bounded work per character; re-scanning the accumulated text would be ~n^2/2 = 5e7
    assert p.chars_scanned <= 60 * len(text)
