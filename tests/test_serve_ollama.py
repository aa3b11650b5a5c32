"""rkllm serve speaks Ollama: tested with the clients written for Ollama, over a real socket, on both ABIs."""

from __future__ import annotations

import asyncio
import json
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
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.serve import ServerSettings, create_app  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
GEMMA = "gemma-3-1b-it_w8a8.rkllm"
EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
KEY = "s3cret"


@pytest.fixture
def manager(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ModelManager]:
    make_model(model_dir, QWEN)
    make_model(model_dir, GEMMA, think=False)
    make_model(model_dir, EMBED)
    m = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=3)
    yield m
    m.close()


@pytest.fixture
def start(manager: ModelManager) -> Iterator[Callable[..., str]]:
    """Start ``rkllm serve``'s app on a free port; returns its base URL."""
    servers: list[tuple[Any, threading.Thread]] = []

    def factory(**settings: Any) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(manager, ServerSettings(board="board-o", **settings))
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        servers.append((srv, thread))
        deadline = time.monotonic() + 20
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield factory
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(20)


@pytest.fixture
def url(start: Callable[..., str]) -> str:
    return start()


# -- the official ollama client --------------------------------------------------------------------------------


def test_list_show_ps_and_version(url: str) -> None:
    client = ollama.Client(host=url)
    names = {m.model for m in client.list().models}
    assert names == {"qwen3-0.6b:latest", "gemma3-1b:latest", "qwen3-embedding-0.6b:latest"}
    shown = client.show("qwen3-0.6b")  # untagged, as a user types it
    assert shown.modelinfo["qwen3.context_length"] == 4096
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    assert client.show("qwen3-embedding-0.6b:latest").capabilities == ["embedding"]
    assert client.ps().models == []
    client.generate(model="qwen3-0.6b:latest", prompt="hi", keep_alive="10m")
    (loaded,) = client.ps().models
    assert loaded.model == "qwen3-0.6b:latest" and loaded.context_length == 4096
    assert loaded.expires_at is not None and loaded.expires_at.tzinfo is not None
    assert 0 < (loaded.expires_at.timestamp() - time.time()) <= 600
    version = httpx.get(f"{url}/api/version").json()["version"]
    assert all(part.isdigit() for part in version.split("."))
    assert httpx.get(url).text == "Ollama is running" and httpx.head(url).status_code == 200


def test_chat_whole_and_streamed_with_the_runtimes_counts_in_nanoseconds(
    url: str, sim: SimulatorControl, manager: ModelManager
) -> None:
    sim.set("init_delay_ms", 30)
    client = ollama.Client(host=url)
    generated = sim.counter("generated_tokens")
    reply = client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "hello"}])
    assert reply.message.role == "assistant" and reply.message.content == "Echo: hello — ok."
    assert reply.done and reply.done_reason == "stop"
    assert reply.eval_count == sim.counter("generated_tokens") - generated > 0
    assert reply.load_duration >= 30_000_000  # this request loaded the model: 30 ms, in nanoseconds
    assert reply.total_duration >= reply.load_duration + reply.prompt_eval_duration + reply.eval_duration
    again = client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "hello"}])
    assert again.load_duration == 0  # already loaded

    chunks = list(client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "streamed"}], stream=True))
    assert "".join(c.message.content or "" for c in chunks) == "Echo: streamed — ok."
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert chunks[-1].eval_count and chunks[-1].eval_duration and chunks[-1].prompt_eval_count


def test_chat_continues_the_conversation_in_the_kv_cache(url: str, sim: SimulatorControl) -> None:
    client = ollama.Client(host=url)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    first = client.chat(model="qwen3-0.6b", messages=history)
    history += [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "and then?"}]
    prefilled = sim.counter("prefilled_tokens")
    second = client.chat(model="qwen3-0.6b", messages=history, stream=True)
    last = list(second)[-1]
    assert last.prompt_eval_count == sim.counter("prefilled_tokens") - prefilled  # only the new turn
    assert 0 < last.prompt_eval_count < first.prompt_eval_count
    raw = httpx.post(f"{url}/api/chat", json={"model": "qwen3-0.6b", "messages": history, "stream": False})
    assert raw.headers["x-rkllm-kv-reused"] == "false"  # the same history again: the cache holds a longer one
    history += [{"role": "assistant", "content": raw.json()["message"]["content"]}, {"role": "user", "content": "x"}]
    raw = httpx.post(f"{url}/api/chat", json={"model": "qwen3-0.6b", "messages": history, "stream": False})
    assert raw.headers["x-rkllm-kv-reused"] == "true"
    history += [{"role": "assistant", "content": raw.json()["message"]["content"]}, {"role": "user", "content": "y"}]
    with httpx.stream("POST", f"{url}/api/chat", json={"model": "qwen3-0.6b", "messages": history}) as streamed:
        assert streamed.headers["x-rkllm-kv-reused"] == "true"  # a stream says so in its headers too
        assert streamed.headers["content-type"] == "application/x-ndjson"
        assert json.loads(list(streamed.iter_lines())[-1])["done"]


def test_generate_load_and_unload(url: str, manager: ModelManager) -> None:
    client = ollama.Client(host=url)
    reply = client.generate(model="gemma3-1b", prompt="hello", system="Be brief.")
    assert reply.response == "Echo: hello — ok." and reply.done_reason == "stop" and reply.eval_count
    streamed = list(client.generate(model="gemma3-1b", prompt="in pieces", stream=True))
    assert "".join(c.response for c in streamed) == "Echo: in pieces — ok." and streamed[-1].done
    loaded = client.generate(model="qwen3-0.6b", prompt="")
    assert loaded.done_reason == "load" and manager.is_loaded("qwen3-0.6b")
    gone = client.generate(model="qwen3-0.6b", prompt="", keep_alive=0)
    assert gone.done_reason == "unload" and not manager.is_loaded("qwen3-0.6b")
    # Open WebUI's unload goes through /api/chat with no messages
    assert (
        httpx.post(f"{url}/api/chat", json={"model": "gemma3-1b:latest", "messages": [], "keep_alive": 0}).json()[
            "done_reason"
        ]
        == "unload"
    )
    assert not manager.is_loaded("gemma3-1b")


def test_embed_and_the_older_embeddings(url: str) -> None:
    client = ollama.Client(host=url)
    out = client.embed(model="qwen3-embedding-0.6b", input=["a cat", "a dog"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) > 8 and out.embeddings[0] != out.embeddings[1]
    assert out.prompt_eval_count and out.total_duration
    one = client.embeddings(model="qwen3-embedding-0.6b:latest", prompt="a cat")
    assert list(one.embedding) == pytest.approx(out.embeddings[0])


def test_tools_arguments_are_objects_and_results_go_back(url: str) -> None:
    client = ollama.Client(host=url)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris? use get_weather"}]
    reply = client.chat(model="qwen3-0.6b", messages=messages, tools=[WEATHER])
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert call.function.arguments["city"]
    messages += [reply.message, {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}]
    final = client.chat(model="qwen3-0.6b", messages=messages, tools=[WEATHER])
    assert "sunny, 21 C" in final.message.content
    history = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
    history += [final.message.model_dump(exclude_none=True), {"role": "user", "content": "thanks"}]
    body = {"model": "qwen3-0.6b", "messages": history, "tools": [WEATHER], "stream": False}
    assert httpx.post(f"{url}/api/chat", json=body).headers["x-rkllm-kv-reused"] == "true"  # across the tool turn
    streamed = list(client.chat(model="qwen3-0.6b", messages=messages[:1], tools=[WEATHER], stream=True))
    calls = [tc for c in streamed for tc in (c.message.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and isinstance(calls[0].function.arguments, dict)


def test_options_reach_the_runtime(url: str, sim: SimulatorControl) -> None:
    def values(node: Any, key: str) -> Iterator[Any]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from ([v] if k == key else values(v, key))
        elif isinstance(node, list):
            for item in node:
                yield from values(item, key)

    sim.set("trace", 1)
    client = ollama.Client(host=url)
    options = {"num_predict": 3, "top_k": 7, "temperature": 0.3, "repeat_penalty": 1.2, "seed": 42, "num_ctx": 99999}
    reply = client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "count to 50"}], options=options)
    assert reply.done_reason == "length" and reply.message.content == "1 2 3 4 5 6 "  # 3 of the simulator's tokens
    calls = [t for t in sim.trace() if t["fn"] in ("rkllm_init", "rkllm_run")]
    assert 7 in list(values(calls, "top_k"))
    assert any(t == pytest.approx(0.3) for t in values(calls, "temperature"))  # float32 in the runtime
    stopped = client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "hello"}], options={"stop": ["ok"]})
    assert stopped.message.content == "Echo: hello — "


def test_format_json_schema_and_think(url: str) -> None:
    client = ollama.Client(host=url)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = client.chat(
        model="qwen3-0.6b",
        messages=[{"role": "user", "content": "Plan a trip to 'Lyon'."}],
        format=schema,
        options={"stop": ["\n\n"], "num_predict": 200},
    )
    assert set(json.loads(reply.message.content)) == {"city"}
    thought = client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "hi"}], think=True)
    assert thought.message.thinking and "<think>" not in thought.message.content


def test_errors_before_and_after_the_stream_began(url: str, sim: SimulatorControl) -> None:
    client = ollama.Client(host=url)
    for model in ("nope", "qwen3-0.6b:7b", "../../etc/passwd"):
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=model, messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 404
    image = {"role": "user", "content": "what is this?", "images": ["aGVsbG8="]}
    with pytest.raises(ollama.ResponseError, match="images") as err:
        client.chat(model="qwen3-0.6b", messages=[image])
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="qwen3-embedding-0.6b", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400
    sim.set("error_after_tokens", 3)
    stream = client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "count to 50"}], stream=True)
    with pytest.raises(ollama.ResponseError):
        list(stream)
    sim.set("error_after_tokens", -1)
    assert client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "still"}]).message.content
    unknown = httpx.get(f"{url}/api/nothing-here")
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_the_api_key_is_the_same_as_for_v1(start: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    url = start(api_key=KEY)
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=url).list()
    assert err.value.status_code == 401
    assert httpx.post(f"{url}/api/chat", json={}).json() == {"error": err.value.error}
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
    assert client.chat(model="qwen3-0.6b", messages=[{"role": "user", "content": "hi"}]).message.content
    assert httpx.get(url).status_code == 200 and httpx.get(f"{url}/api/version").status_code == 200
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)  # the ollama client sends it as the Bearer header
    assert [m.model for m in ollama.Client(host=url).list().models]


# -- LangChain and LlamaIndex's Ollama classes --------------------------------------------------------------


def test_langchain_chat_ollama_and_ollama_embeddings(url: str) -> None:
    langchain_ollama = pytest.importorskip("langchain_ollama")
    chat = langchain_ollama.ChatOllama(model="qwen3-0.6b", base_url=url, validate_model_on_init=True)
    reply = chat.invoke("hello")
    assert reply.content == "Echo: hello — ok."
    assert reply.usage_metadata["output_tokens"] > 0 and reply.usage_metadata["input_tokens"] > 0
    assert "".join(str(c.content) for c in chat.stream("streamed")) == "Echo: streamed — ok."
    tool_reply = chat.bind_tools([WEATHER]).invoke("What is the weather in Paris? use get_weather")
    assert tool_reply.tool_calls[0]["name"] == "get_weather" and tool_reply.tool_calls[0]["args"]["city"]
    embeddings = langchain_ollama.OllamaEmbeddings(model="qwen3-embedding-0.6b", base_url=url)
    vectors = embeddings.embed_documents(["a cat", "a dog"])
    assert len(vectors) == 2 and vectors[0] == pytest.approx(embeddings.embed_query("a cat"), abs=1e-6)


def test_llamaindex_ollama_reads_the_context_window(url: str) -> None:
    llms_ollama = pytest.importorskip("llama_index.llms.ollama")
    emb_ollama = pytest.importorskip("llama_index.embeddings.ollama")
    from llama_index.core.llms import ChatMessage

    llm = llms_ollama.Ollama(model="qwen3-0.6b", base_url=url, request_timeout=30)
    assert llm.metadata.context_window == 4096
    assert llm.chat([ChatMessage(role="user", content="hello")]).message.content == "Echo: hello — ok."
    assert llm.complete("again").text == "Echo: again — ok."
    embed = emb_ollama.OllamaEmbedding(model_name="qwen3-embedding-0.6b", base_url=url)
    assert len(embed.get_text_embedding("a cat")) > 8


# -- load --------------------------------------------------------------------------------------------------------


def test_64_concurrent_mixed_ollama_and_openai_streams_over_two_models(
    url: str, sim: SimulatorControl, manager: ModelManager
) -> None:
    sim.set("token_delay_ms", 1)

    async def via_ollama(client: Any, i: int, model: str) -> str:
        stream = await client.chat(model=model, messages=[{"role": "user", "content": f"question {i}"}], stream=True)
        return "".join([c.message.content or "" async for c in stream])

    async def via_openai(client: Any, i: int, model: str) -> str:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"question {i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        oll = ollama.AsyncClient(host=url)
        oai = openai.AsyncOpenAI(api_key="none", base_url=f"{url}/v1", max_retries=0)
        jobs = []
        for i in range(64):
            model = "qwen3-0.6b" if i % 2 else "gemma3-1b"
            jobs.append(via_ollama(oll, i, model) if i % 4 < 2 else via_openai(oai, i, model))
        return await asyncio.wait_for(asyncio.gather(*jobs), 120)

    answers = asyncio.run(main())
    assert answers == [f"Echo: question {i} — ok." for i in range(64)]
    assert sim.counter("active_runs") == 0 and manager.waiting() == 0
    live = sim.counter("live_handles")
    manager.close()
    assert sim.counter("live_handles") == live - 2  # the two models' handles, and no other


def test_the_shutdowns_abort_ends_streams_with_an_error_line(manager: ModelManager, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 20)
    app = create_app(manager, ServerSettings(board="board-o"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "count to 500"}]}

    async def main() -> tuple[list[dict[str, Any]], httpx.Response]:
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.create_task(srv.serve())
        while not srv.started:
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                lines: list[dict[str, Any]] = []
                async with http.stream("POST", "/api/chat", json=body) as response:
                    async for line in response.aiter_lines():
                        lines.append(json.loads(line))
                        if len(lines) == 1:  # the stream holds the model: this one waits behind it
                            whole = asyncio.create_task(http.post("/api/chat", json={**body, "stream": False}))
                        if len(lines) == 3:
                            app.state.rkllm.stopping.abort()  # what the shutdown timeout does
                return lines, await whole
        finally:
            srv.should_exit = True
            await serving

    lines, whole = asyncio.run(main())
    assert lines[-1] == {"error": "the server is shutting down; the request was aborted"}
    assert all(not line.get("done") for line in lines[:-1])
    assert whole.status_code == 503 and "shutting down" in whole.json()["error"]
    assert sim.counter("active_runs") == 0 and sim.counter("aborts") >= 1


def test_the_readme_ollama_curl_examples_work(url: str) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text(encoding="utf-8")
    section = page.split("## Ollama's API on the same port", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").replace(",\n", ", ").splitlines() if c.strip()]
    assert len(commands) >= 4 and all(c.startswith("curl") for c in commands)
    for command in commands:
        command = command.split("  #", 1)[0].replace("localhost:8080", url.removeprefix("http://"))
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True).stdout
        body = json.loads(out)
        assert "error" not in body and body, (command, body)


def test_keep_alive_unloads_a_model_after_its_request(url: str, manager: ModelManager) -> None:
    client = ollama.Client(host=url)
    client.generate(model="gemma3-1b", prompt="stay", keep_alive=-1)
    reply = client.generate(model="qwen3-0.6b", prompt="then go", keep_alive=0)  # answered, then unloaded
    assert reply.response == "Echo: then go — ok."
    end = time.monotonic() + 20
    while manager.is_loaded("qwen3-0.6b") and time.monotonic() < end:
        time.sleep(0.01)
    assert not manager.is_loaded("qwen3-0.6b") and manager.is_loaded("gemma3-1b")
    [row] = client.ps().models
    assert row.model.startswith("gemma3-1b") and row.expires_at is not None and row.expires_at.year == 9999
    client.generate(model="qwen3-0.6b", prompt="", keep_alive="90s")
    until = {m.model.split(":")[0]: m.expires_at for m in client.ps().models}["qwen3-0.6b"]
    assert until is not None and 0 < until.timestamp() - time.time() <= 90


def test_serve_keep_alive_option_reads_durations() -> None:
    import argparse

    from rkllm_core.serve.run import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--keep-alive", "5m"]).keep_alive == 300
    assert parser.parse_args(["--keep-alive", "-1"]).keep_alive == -1
    assert parser.parse_args([]).keep_alive is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--keep-alive", "soon"])


def test_home_assistant_conversation_calls(start: Callable[..., str]) -> None:
    """The requests Home Assistant's Ollama integration makes: a URL (and, in recent versions, an optional key).

    Its set-up lists the models (``model`` fields), then each turn streams ``/api/chat`` with tools,
    ``keep_alive=-1``, ``options={"num_ctx": 8192}`` (its default, above this model's context),
    ``think=False``, and tool results sent back as ``role: tool`` with a JSON content.
    """

    async def conversation(url: str, headers: dict[str, str] | None) -> tuple[set[str], list[Any], str]:
        client = ollama.AsyncClient(host=url, headers=headers)
        models = {m["model"] for m in (await client.list()).get("models", [])}
        messages: list[Any] = [
            ollama.Message(role="system", content="You control a house."),
            ollama.Message(role="user", content="What is the weather in Paris? use get_weather"),
        ]
        common = dict(tools=[WEATHER], stream=True, keep_alive=-1, options={"num_ctx": 8192}, think=False)
        calls = []
        async for part in await client.chat(model="qwen3-0.6b:latest", messages=messages, **common):
            calls += part["message"].get("tool_calls") or []
        messages.append(ollama.Message(role="assistant", content="", tool_calls=calls))
        messages.append(ollama.Message(role="tool", content=json.dumps({"data": "sunny, 21 C", "error": None})))
        text = ""
        async for part in await client.chat(model="qwen3-0.6b:latest", messages=messages, **common):
            text += part["message"].get("content") or ""
        return models, calls, text

    for headers, settings in ((None, {}), ({"Authorization": f"Bearer {KEY}"}, {"api_key": KEY})):
        models, calls, text = asyncio.run(conversation(start(**settings), headers))
        assert "qwen3-0.6b:latest" in models
        assert calls and calls[0]["function"]["name"] == "get_weather" and calls[0]["function"]["arguments"]["city"]
        assert "sunny, 21 C" in text


# -- /api/pull: rkllm pull's code behind Ollama's endpoint, against a local fake Hub ----------------------------


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as constants

    from .fakehub import serve

    with serve() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read when a pull starts, as a service's environment is
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


def test_api_pull_streams_progress_and_the_model_serves(
    url: str, fake_hub: Any, tmp_path: Path, model_dir: Path, manager: ModelManager
) -> None:
    data = make_model(tmp_path / "upstream", "Qwen3-1.7B-rk3588-w8a8.rkllm").read_bytes()
    fake_hub.add("acme/Qwen3-1.7B-rkllm", {"Qwen3-1.7B-rk3588-w8a8.rkllm": data, "README.md": b"# a model"})
    client = ollama.Client(host=url)
    assert "qwen3-1.7b:latest" not in {m.model for m in client.list().models}
    steps = list(client.pull("hf.co/acme/Qwen3-1.7B-rkllm", stream=True))
    assert steps[-1].status == "success"
    model_steps = [s for s in steps if s.digest == "Qwen3-1.7B-rk3588-w8a8.rkllm"]
    assert model_steps[-1].completed == model_steps[-1].total == len(data)  # the client's own progress fields
    assert "qwen3-1.7b:latest" in {m.model for m in client.list().models}
    assert client.generate(model="qwen3-1.7b", prompt="pulled").response == "Echo: pulled — ok."
    # named the way it was pulled, as Home Assistant and Open WebUI go on naming it
    as_pulled = "hf.co/acme/Qwen3-1.7B-rkllm:latest"
    assert client.chat(model=as_pulled, messages=[{"role": "user", "content": "x"}]).message.content == "Echo: x — ok."
    assert client.show(as_pulled).modelinfo
    with pytest.raises(ollama.ResponseError) as never_pulled:
        client.chat(model="hf.co/acme/other:latest", messages=[{"role": "user", "content": "x"}])
    assert never_pulled.value.status_code == 404
    assert client.pull("hf.co/acme/Qwen3-1.7B-rkllm", stream=False).status == "success"  # again: nothing to fetch
    assert len(fake_hub.file_gets(".rkllm")) == 1
    assert client.pull("qwen3-0.6b:latest").status == "success"  # a model the server has: nothing to do


def test_api_pull_errors_are_ollama_errors(url: str, fake_hub: Any) -> None:
    client = ollama.Client(host=url)
    with pytest.raises(ollama.ResponseError, match="no repository acme/nothing"):
        list(client.pull("hf.co/acme/nothing", stream=True))  # an error line after the stream began
    with pytest.raises(ollama.ResponseError, match="no repository acme/nothing") as whole:
        client.pull("hf.co/acme/nothing", stream=False)
    assert whole.value.status_code == 502
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("llama3.2:latest")  # not here, and not a Hugging Face reference
    assert unknown.value.status_code == 404
    reply = httpx.post(f"{url}/api/pull", json={"stream": False})
    assert reply.status_code == 400 and "model" in reply.json()["error"]
