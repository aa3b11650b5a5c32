"""rkllm serve: the OpenAI wire format, tested with the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from rkllm_core.embed.recipes import QWEN3_RERANKER  # noqa: E402
from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.serve import ServerSettings, create_app  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
GEMMA = "gemma-3-1b-it_w8a8.rkllm"
EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
RERANK = "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def manager(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, tmp_path: Path) -> Iterator[ModelManager]:
    make_model(model_dir, QWEN)
    make_model(model_dir, GEMMA, think=False)
    make_model(model_dir, EMBED)
    make_model(model_dir, RERANK, yes_token=QWEN3_RERANKER.yes_id, no_token=QWEN3_RERANKER.no_id)
    m = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=3)
    yield m
    m.close()


@pytest.fixture
def make_client(manager: ModelManager) -> Callable[..., httpx.AsyncClient]:
    def factory(**settings: Any) -> httpx.AsyncClient:
        app = create_app(manager, ServerSettings(board="board-a", **settings))
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    return factory


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def openai_client(http: httpx.AsyncClient, key: str = "none") -> Any:
    return openai.AsyncOpenAI(api_key=key, base_url="http://test/v1", http_client=http, max_retries=0)


# -- the official client -------------------------------------------------------------------------------------


def test_models_list_names_kinds_and_context(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> Any:
        async with make_client() as http:
            return await openai_client(http).models.list()

    models = {m.id: m for m in run(main()).data}
    assert set(models) == {"qwen3-0.6b", "gemma3-1b", "qwen3-embedding-0.6b", "qwen3-reranker-0.6b"}
    assert models["qwen3-0.6b"].model_extra["kind"] == "chat"
    assert models["qwen3-embedding-0.6b"].model_extra["kind"] == "embedding"
    assert models["qwen3-0.6b"].model_extra["context_length"] == 4096


def test_models_retrieve_one_model(make_client: Callable[..., httpx.AsyncClient], manager: ModelManager) -> None:
    async def main() -> tuple[Any, Any]:
        async with make_client() as http:
            client = openai_client(http)
            before = await client.models.retrieve("qwen3-0.6b")
            await client.chat.completions.create(model="qwen3-0.6b", messages=[{"role": "user", "content": "hi"}])
            return before, await client.models.retrieve("qwen3-0.6b")

    before, after = run(main())
    info = manager.resolve("qwen3-0.6b")
    assert before.id == info.name and before.object == "model"
    assert before.model_extra["context_length"] == info.context_size and before.model_extra["kind"] == "chat"
    assert before.model_extra["loaded"] is False and after.model_extra["loaded"] is True


def test_text_completion_whole_and_streamed(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> tuple[Any, list[Any]]:
        async with make_client() as http:
            client = openai_client(http)
            whole = await client.completions.create(model="qwen3-0.6b", prompt="count to 6", max_tokens=64)
            stream = await client.completions.create(
                model="qwen3-0.6b", prompt=["count to 4"], stream=True, stream_options={"include_usage": True}
            )
            return whole, [c async for c in stream]

    whole, chunks = run(main())
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == "1 2 3 4 5 6" and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "1 2 3 4"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_text_completion_refuses_what_it_cannot_honour(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> list[Any]:
        async with make_client() as http:
            client = openai_client(http)
            errors = []
            for extra in ({"echo": True}, {"best_of": 3}, {"suffix": "end"}, {"prompt": [1, 2, 3]}):
                kwargs: dict[str, Any] = {"model": "qwen3-0.6b", "prompt": "hi", **extra}
                with pytest.raises(openai.BadRequestError) as bad:
                    await client.completions.create(**kwargs)
                errors.append(bad.value.body)
            with pytest.raises(openai.BadRequestError) as bad:
                await client.completions.create(model="qwen3-0.6b", prompt="hi", max_tokens=10**6)
            errors.append(bad.value.body)
            return errors

    params = [e["param"] for e in run(main())]
    assert params == ["echo", "best_of", "suffix", "prompt", "max_tokens"]


def test_a_validation_error_is_a_422_openai_error_object() -> None:
    from fastapi.exceptions import RequestValidationError

    from rkllm_core.serve.openai import error_response

    exc = RequestValidationError([{"loc": ("query", "limit"), "msg": "Input should be a valid integer", "type": "x"}])
    response = error_response(exc)
    body = json.loads(bytes(response.body))
    assert response.status_code == 422
    assert body["error"]["param"] == "limit" and body["error"]["type"] == "invalid_request_error"
    assert "valid integer" in body["error"]["message"]


def test_chat_completion_and_kv_reuse_across_requests(
    make_client: Callable[..., httpx.AsyncClient], sim: SimulatorControl
) -> None:
    async def main() -> None:
        async with make_client() as http:
            client = openai_client(http)
            history: list[dict[str, Any]] = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"},
            ]
            raw = await client.chat.completions.with_raw_response.create(model="qwen3-0.6b", messages=history)
            first = raw.parse()
            assert raw.headers["x-rkllm-board"] == "board-a" and raw.headers["x-rkllm-kv-reused"] == "false"
            assert first.choices[0].message.content == "Echo: hello — ok."
            assert first.choices[0].finish_reason == "stop" and first.object == "chat.completion"
            assert first.usage.prompt_tokens > first.usage.completion_tokens > 0
            history += [{"role": "assistant", "content": first.choices[0].message.content}]
            history += [{"role": "user", "content": "and then?"}]
            prefilled = sim.counter("prefilled_tokens")
            raw = await client.chat.completions.with_raw_response.create(model="qwen3-0.6b", messages=history)
            second = raw.parse()
            assert raw.headers["x-rkllm-kv-reused"] == "true"  # the client resent the history: only the turn is new
            assert second.usage.prompt_tokens_details.cached_tokens > 0
            assert sim.counter("prefilled_tokens") - prefilled < second.usage.prompt_tokens / 2

    run(main())


def test_a_stream_says_whether_it_reuses_the_kv_cache_before_its_first_token(
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    async def turn(http: httpx.AsyncClient, history: list[dict[str, Any]]) -> tuple[str, str]:
        body = {"model": "qwen3-0.6b", "messages": history, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            header = r.headers["x-rkllm-kv-reused"]  # before any body is read
            text = ""
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
        return header, text

    async def main() -> list[str]:
        async with make_client() as http:
            history: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]
            first, answer = await turn(http, history)
            history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
            second, _ = await turn(http, history)
            other, _ = await turn(http, [{"role": "user", "content": "something else"}])
            return [first, second, other]

    assert run(main()) == ["false", "true", "false"]


def test_the_engine_reports_its_kv_plan_before_the_run(manager: ModelManager) -> None:
    from rkllm_core.chat.engine import ChatEngine, TextDelta
    from rkllm_core.chat.messages import ChatMessage

    engine = ChatEngine(manager)
    seen: list[object] = []

    def on_start(reused: bool) -> None:
        seen.append(reused)

    history = [ChatMessage("user", "hello")]
    for event in engine.stream("qwen3-0.6b", history, on_start=on_start):
        if isinstance(event, TextDelta):
            assert seen == [False]  # called before the first token
    done = engine.chat("qwen3-0.6b", history)
    history += [done.message, ChatMessage("user", "more")]
    events = list(engine.stream("qwen3-0.6b", history, on_start=on_start))
    assert seen == [False, events[-1].kv_reused] == [False, True]  # type: ignore[union-attr]


def test_one_access_log_line_per_request(
    make_client: Callable[..., httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    from rkllm_core.serve.deps import ACCESS_LOGGER

    async def main(**settings: Any) -> Any:
        async with make_client(**settings) as http:
            client = openai_client(http)
            done = await client.chat.completions.create(
                model="qwen3-0.6b", messages=[{"role": "user", "content": "count to 3"}]
            )
            stream = await client.chat.completions.create(
                model="qwen3-0.6b", messages=[{"role": "user", "content": "count to 2"}], stream=True
            )
            _ = [c async for c in stream]
            await client.embeddings.create(model="qwen3-embedding-0.6b", input="hello there")
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("nope")
            return done.usage

    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        usage = run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 4, lines
    tokens = f"tokens={usage.prompt_tokens}+{usage.completion_tokens}"
    assert re.fullmatch(rf"\S+ POST /v1/chat/completions model=qwen3-0.6b 200 {re.escape(tokens)} \d+ms", lines[0])
    assert re.fullmatch(r"\S+ POST /v1/chat/completions model=qwen3-0.6b 200 tokens=\d+\+[1-9]\d* \d+ms", lines[1])
    assert re.fullmatch(r"\S+ POST /v1/embeddings model=qwen3-embedding-0.6b 200 tokens=[1-9]\d*\+0 \d+ms", lines[2])
    assert re.fullmatch(r"\S+ GET /v1/models/nope model=- 404 tokens=- \d+ms", lines[3])

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        run(main(access_log=False))
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]


def test_streaming_with_usage_and_done(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> None:
        async with make_client() as http:
            stream = await openai_client(http).chat.completions.create(
                model="qwen3-0.6b",
                messages=[{"role": "user", "content": "count to 5"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "1 2 3 4 5"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    run(main())


def test_sse_framing_on_the_wire(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> list[str]:
        async with make_client() as http:
            body = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                return [line async for line in response.aiter_lines()]

    lines = run(main())
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[1][6:])["object"] == "chat.completion.chunk"


def test_tools_and_tool_results(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> None:
        async with make_client() as http:
            client = openai_client(http)
            messages: list[dict[str, Any]] = [
                {"role": "user", "content": "What is the weather in Paris? use get_weather"}
            ]
            reply = await client.chat.completions.create(model="qwen3-0.6b", messages=messages, tools=[WEATHER])
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls"
            call = choice.message.tool_calls[0]
            assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
            messages += [choice.message.model_dump(exclude_none=True)]
            messages += [{"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
            final = await client.chat.completions.create(model="qwen3-0.6b", messages=messages, tools=[WEATHER])
            assert "sunny, 21 C" in final.choices[0].message.content
            streamed = await client.chat.completions.create(
                model="qwen3-0.6b", messages=messages[:1], tools=[WEATHER], stream=True
            )
            deltas = [c.choices[0].delta for c in [c async for c in streamed] if c.choices]
            calls = [tc for d in deltas for tc in (d.tool_calls or [])]
            assert calls[0].function.name == "get_weather"
            assert json.loads("".join(tc.function.arguments or "" for tc in calls))["city"]

    run(main())


def test_embeddings_and_rerank(make_client: Callable[..., httpx.AsyncClient]) -> None:
    docs = ["The cat sat on the mat.", "Banks raised interest rates.", "NPU boards run models."]

    async def main() -> None:
        async with make_client() as http:
            client = openai_client(http)
            result = await client.embeddings.create(model="qwen3-embedding-0.6b", input=docs)
            vectors = [d.embedding for d in result.data]
            assert len(vectors) == 3 and len(vectors[0]) == 256 and result.usage.prompt_tokens > 0
            one = await client.embeddings.create(model="qwen3-embedding-0.6b", input=docs[0])  # base64 by default
            assert one.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
            ranked = (
                await http.post(
                    "/v1/rerank",
                    json={
                        "model": "qwen3-reranker-0.6b",
                        "query": "interest rates at banks",
                        "documents": docs,
                        "top_n": 2,
                    },
                )
            ).json()
            assert [r["index"] for r in ranked["results"]][0] == 1 and len(ranked["results"]) == 2
            assert ranked["results"][0]["document"]["text"] == docs[1]

    run(main())


# -- errors, limits, auth ----------------------------------------------------------------------------------


def test_errors_are_openai_error_objects_and_the_server_keeps_serving(
    make_client: Callable[..., httpx.AsyncClient], manager: ModelManager
) -> None:
    async def main() -> None:
        async with make_client(max_tokens=100) as http:
            client = openai_client(http)
            with pytest.raises(openai.NotFoundError) as nf:
                await client.chat.completions.create(model="qwen9", messages=[{"role": "user", "content": "x"}])
            assert nf.value.code == "model_not_found"
            with pytest.raises(openai.BadRequestError) as kind:
                await client.chat.completions.create(
                    model="qwen3-embedding-0.6b", messages=[{"role": "user", "content": "x"}]
                )
            assert kind.value.code == "wrong_model_kind"
            with pytest.raises(openai.BadRequestError) as kind:
                await client.embeddings.create(model="qwen3-0.6b", input="x")
            assert kind.value.code == "wrong_model_kind"
            bad = await http.post("/v1/chat/completions", content=b"{not json")
            assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
            bad = await http.post("/v1/chat/completions", json={"model": "qwen3-0.6b", "messages": [{"role": "robot"}]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0].role"
            bad = await http.post(
                "/v1/chat/completions",
                json={"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000},
            )
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
            image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
            bad = await http.post(
                "/v1/chat/completions", json={"model": "qwen3-0.6b", "messages": [{"role": "user", "content": image}]}
            )
            assert bad.status_code == 400 and "base64 data URL" in bad.json()["error"]["message"]
            big = await http.post(
                "/v1/embeddings", content=b"x" * 30_000_000, headers={"content-type": "application/json"}
            )
            assert big.status_code == 413
            ok = await client.chat.completions.create(
                model="qwen3-0.6b", messages=[{"role": "user", "content": "fine"}]
            )
            assert ok.choices[0].message.content == "Echo: fine — ok."

    run(main())
    assert manager.waiting() == 0


def test_api_key_is_required_except_for_health(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> None:
        async with make_client(api_key="s3cret") as http:
            assert (await http.get("/health")).status_code == 200
            denied = await http.get("/v1/models")
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await openai_client(http, "wrong").models.list()
            assert (await openai_client(http, "s3cret").models.list()).data

    run(main())


def test_64_concurrent_streams_over_two_models(
    make_client: Callable[..., httpx.AsyncClient], sim: SimulatorControl
) -> None:
    sim.set("token_delay_ms", 1)

    async def one(client: Any, i: int) -> str:
        model = "qwen3-0.6b" if i % 2 else "gemma3-1b"
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"question {i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        async with make_client() as http:
            client = openai_client(http)
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 120)

    answers = run(main())
    assert answers == [f"Echo: question {i} — ok." for i in range(64)]


# -- a real socket, the sync client ----------------------------------------------------------------------


@pytest.fixture
def server(manager: ModelManager) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(manager), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(20)


def test_sync_client_over_a_socket(server: str) -> None:
    client = openai.OpenAI(api_key="none", base_url=server, max_retries=0)
    reply = client.chat.completions.create(model="qwen3-0.6b", messages=[{"role": "user", "content": "over tcp"}])
    assert reply.choices[0].message.content == "Echo: over tcp — ok."
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="qwen3-0.6b", messages=[{"role": "user", "content": "streamed"}], stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == "Echo: streamed — ok."
    assert len(client.embeddings.create(model="qwen3-embedding-0.6b", input=["a", "b"]).data) == 2


def test_a_client_that_goes_away_aborts_its_generation(
    server: str, sim: SimulatorControl, manager: ModelManager
) -> None:
    sim.set("token_delay_ms", 20)
    body = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "count to 500"}], "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{server}/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content": "1' in line:
                break  # the client hangs up after the first number
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (sim.counter("aborts") and sim.counter("active_runs") == 0):
        time.sleep(0.02)
    assert sim.counter("aborts") >= 1 and sim.counter("active_runs") == 0
    assert sim.counter("generated_tokens") < 200  # 500 numbers are about 500 tokens
    reply = openai.OpenAI(api_key="none", base_url=server, max_retries=0).chat.completions.create(
        model="qwen3-0.6b", messages=[{"role": "user", "content": "still here"}]
    )
    assert reply.choices[0].message.content == "Echo: still here — ok."
    assert manager.waiting() == 0


def test_response_format_json_schema(make_client: Callable[..., httpx.AsyncClient]) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    }

    async def main() -> Any:
        async with make_client() as http:
            return await openai_client(http).chat.completions.create(
                model="qwen3-0.6b",
                messages=[{"role": "user", "content": "Plan a trip to 'Lyon'."}],
                response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}},
                stop=["\n\n"],
                max_completion_tokens=200,
                temperature=0.2,
            )

    reply = run(main())
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"city", "days"} and isinstance(data["days"], int)


def test_metrics_in_prometheus_text(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> str:
        async with make_client() as http:
            client = openai_client(http)
            for model in ("qwen3-0.6b", "gemma3-1b", "qwen3-0.6b"):
                await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            await client.embeddings.create(model="qwen3-embedding-0.6b", input=["a b c"])
            await http.post(
                "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
            )
            response = await http.get("/metrics")
            assert response.headers["content-type"].startswith("text/plain")
            return response.text

    text = run(main())

    def value(line_start: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    assert value('rkllm_requests_total{code="200",endpoint="/v1/chat/completions"}') == 3
    assert value('rkllm_requests_total{code="404",endpoint="/v1/chat/completions"}') == 1
    assert value('rkllm_tokens_total{kind="completion",model="qwen3-0.6b"}') > 0
    assert value('rkllm_tokens_total{kind="embedded",model="qwen3-embedding-0.6b"}') > 0
    assert value('rkllm_time_to_first_token_seconds_count{model="gemma3-1b"}') == 1
    assert value("rkllm_model_loads_total") == 3 and value("rkllm_queue_depth") == 0
    assert 'rkllm_loaded_models{model="qwen3-embedding-0.6b"} 1.0' in text


# -- the frameworks' own OpenAI clients, pointed at the server -----------------------------------------------


def test_langchain_chat_openai_and_openai_embeddings(server: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(model="qwen3-0.6b", base_url=server, api_key="none", max_retries=0)
    assert chat.invoke("hello from langchain").content == "Echo: hello from langchain — ok."
    assert "".join(str(c.content) for c in chat.stream("streamed")) == "Echo: streamed — ok."
    answers = asyncio.run(chat.abatch(["one", "two", "three"]))
    assert [a.content for a in answers] == [f"Echo: {w} — ok." for w in ("one", "two", "three")]
    # check_embedding_ctx_length=False: send the texts, not tiktoken ids (this is not an OpenAI model).
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="qwen3-embedding-0.6b", base_url=server, api_key="none", check_embedding_ctx_length=False, max_retries=0
    )
    vectors = embeddings.embed_documents(["the cat sat on the mat", "a cat on a mat", "interest rates rose"])
    query = embeddings.embed_query("where did the cat sit")
    assert len(vectors) == 3 and len(query) == 256

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])


def test_llamaindex_openai_like(server: str) -> None:
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage as LIMessage

    llm = openai_like.OpenAILike(
        model="qwen3-0.6b", api_base=server, api_key="none", is_chat_model=True, context_window=4096, max_retries=0
    )
    assert llm.chat([LIMessage(role="user", content="from llamaindex")]).message.content == (
        "Echo: from llamaindex — ok."
    )
    assert "".join(r.delta or "" for r in llm.stream_complete("streaming")) == "Echo: streaming — ok."
    assert asyncio.run(llm.acomplete("async")).text == "Echo: async — ok."


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)")
def test_the_readme_curl_examples_work(server: str) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text(encoding="utf-8")
    section = page.split("## The OpenAI API", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("curl")]
    assert len(commands) >= 3
    port = server.rsplit(":", 1)[1].split("/")[0]
    for command in commands:
        command = command.split("  #", 1)[0].replace("localhost:8080", f"127.0.0.1:{port}")
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True).stdout
        body = json.loads(out)
        assert "error" not in body, (command, body)
        assert body.get("object") in ("list", "chat.completion"), body


def test_model_names_never_open_files_from_the_request(
    make_client: Callable[..., httpx.AsyncClient], model_dir: Path, tmp_path: Path, sim: SimulatorControl
) -> None:
    outside = make_model(tmp_path / "elsewhere", "Qwen3-1.7B-rk3588-w8a8.rkllm")  # a valid model, not registered

    async def main() -> None:
        async with make_client() as http:
            for name in (str(outside), "../elsewhere/Qwen3-1.7B-rk3588-w8a8.rkllm", str(model_dir / QWEN), "~/x.rkllm"):
                for path, body in (
                    ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]}),
                    ("/v1/embeddings", {"model": name, "input": "x"}),
                    ("/v1/rerank", {"model": name, "query": "q", "documents": ["d"]}),
                ):
                    r = await http.post(path, json=body)
                    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (name, path)
            ok = await http.post(
                "/v1/chat/completions", json={"model": QWEN, "messages": [{"role": "user", "content": "x"}]}
            )
            assert ok.status_code == 200  # a registered file's name (no path) is a name like any other

    run(main())
    assert sim.counter("inits") == 1


def test_each_model_has_a_bounded_line(make_client: Callable[..., httpx.AsyncClient], sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 30)
    body = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "count to 20"}], "stream": True}

    async def main() -> None:
        async with make_client(max_waiting=2) as http:
            running = [asyncio.create_task(http.post("/v1/chat/completions", json=body)) for _ in range(2)]
            await asyncio.sleep(0.3)  # both are in flight: one generating, one waiting for the NPU
            refused = await http.post("/v1/chat/completions", json={**body, "stream": False})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            other = await http.post(
                "/v1/chat/completions", json={"model": "gemma3-1b", "messages": [{"role": "user", "content": "hi"}]}
            )
            assert other.status_code == 200  # another model's line is its own
            assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200]
            again = await http.post("/v1/chat/completions", json={**body, "stream": False})
            assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"].startswith("1 2 3")

    run(main())


def test_unknown_paths_do_not_grow_the_metrics(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> str:
        async with make_client() as http:
            for i in range(20):
                assert (await http.get(f"/no/such/path/{i}")).status_code == 404
            return (await http.get("/metrics")).text

    text = run(main())
    assert 'rkllm_requests_total{code="404",endpoint="unmatched"} 20.0' in text
    assert "/no/such/path" not in text


def test_unknown_endpoints_under_v1_are_openai_error_objects(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> None:
        async with make_client() as http:
            with pytest.raises(openai.NotFoundError) as nf:
                await openai_client(http).images.generate(prompt="x")  # not served here
            assert nf.value.body["type"] == "invalid_request_error"
            assert "POST /v1/images/generations" in nf.value.body["message"]
            with pytest.raises(openai.NotFoundError) as nf:
                await openai_client(http).models.retrieve("no-such-model")
            assert nf.value.body["code"] == "model_not_found" and nf.value.body["param"] == "model"
            wrong = await http.delete("/v1/completions")
            assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
            wrong = await http.get("/v1/chat/completions")
            assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
            assert wrong.json()["error"]["message"] == "method not allowed: GET /v1/chat/completions"

    run(main())


def test_without_the_key_every_path_but_health_is_401(make_client: Callable[..., httpx.AsyncClient]) -> None:
    async def main() -> None:
        async with make_client(api_key="s3cret") as http:
            for path in ("/metrics", "/v1/no-such-endpoint", "/no/such/path"):
                denied = await http.get(path)
                assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key", path
            assert (await http.post("/health")).status_code == 405  # /health is open, whatever the method
            key = {"authorization": "Bearer s3cret"}
            assert (await http.get("/metrics", headers=key)).status_code == 200
            assert (await http.get("/v1/no-such-endpoint", headers=key)).status_code == 404
            big = await http.post("/v1/embeddings", content=b"x" * 5_000_000, headers={"authorization": "Bearer no"})
            assert big.status_code == 401  # the key is checked before the body

    run(main())


def test_the_runtime_sampling_settings_reach_the_runtime(
    make_client: Callable[..., httpx.AsyncClient], sim: SimulatorControl
) -> None:
    def values(node: Any, key: str) -> Iterator[Any]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from ([v] if k == key else values(v, key))
        elif isinstance(node, list):
            for item in node:
                yield from values(item, key)

    sim.set("trace", 1)
    body = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}], "mirostat": 2, "top_k": 7}

    async def main() -> httpx.Response:
        async with make_client() as http:
            return await http.post("/v1/chat/completions", json=body)

    assert run(main()).status_code == 200
    calls = [t for t in sim.trace() if t["fn"] in ("rkllm_init", "rkllm_run")]
    assert 2 in list(values(calls, "mirostat")) and 7 in list(values(calls, "top_k"))  # per run on 1.3, per init on 1.2


def test_the_sampling_policy_that_served_a_request_is_reported(
    model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, abi: str
) -> None:
    """Runtime 1.2 serves sampling by the manager's policy; the answer says which (``run`` on 1.3)."""
    make_model(model_dir, QWEN)
    manager = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, sampling_policy="fixed")
    expected = "fixed" if abi == "1.2" else "run"
    messages = [{"role": "user", "content": "count to 300"}]

    async def main() -> None:
        app = create_app(manager)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for temperature in (0.2, 0.9):
                raw = await openai_client(http).chat.completions.with_raw_response.create(
                    model="qwen3-0.6b", messages=messages, max_tokens=4, temperature=temperature
                )
                reply = raw.parse()
                assert raw.headers["x-rkllm-sampling-policy"] == expected
                assert reply.usage.model_extra["sampling_policy"] == expected
                assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
            body = {"model": "qwen3-0.6b", "messages": messages, "stream": False, "options": {"num_predict": 4}}
            ollama = await http.post("/api/chat", json=body)
            assert ollama.status_code == 200 and ollama.headers["x-rkllm-sampling-policy"] == expected

    try:
        run(main())
        assert sim.counter("inits") == 1  # neither max_tokens nor temperature loaded another copy
    finally:
        manager.close()
