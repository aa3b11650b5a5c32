"""Images end to end on the simulators, through every framework form and both server APIs.

The RKNN simulator encodes an image into per-region mean colours and the RKLLM simulator names the
dominant colour of each image it receives, so an answer naming red proves that the image sent in a
framework's own form was translated, decoded, encoded and handed to the model. The fixtures fail a
test that leaks an encoder context or output; each test also checks the RKLLM simulator saw no
multimodal contract violation.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from PIL import Image

from langchain_rkllm import ChatRKLLM
from langchain_rkllm._convert import to_core_messages as from_langchain
from llamaindex_rkllm import RKLLM
from llamaindex_rkllm.base import to_core_messages as from_llamaindex
from rkllm_core.chat.vision import image_cache
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.rknn import RKNNLibrary
from rkllm_core.serve import ServerSettings, create_app, ollama_wire, wire
from rkllm_core.sim import RKNNSimulatorControl, SimulatorControl, make_encoder, make_model
from tests import rknn_fixtures

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim

EMBED = 6  # the encoder's embedding width, declared as the VL model's hidden size
VL = "qwen2.5-vl-3b"
RED, BLUE = (230, 20, 20), (10, 30, 220)


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "PNG")
    return out.getvalue()


RED_B64 = base64.b64encode(png(RED)).decode()


@pytest.fixture
def manager(
    model_dir: Path,
    sim_lib: RuntimeLibrary,
    sim: SimulatorControl,
    rknn_lib: RKNNLibrary,
    rknn_sim: RKNNSimulatorControl,
) -> Iterator[ModelManager]:
    """A Qwen2.5-VL model with its image encoder, on both simulators."""
    make_model(model_dir, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=EMBED, think=False)
    make_encoder(model_dir, "qwen2.5-vl-3b_vision_rk3588.rknn", height=32, width=32, tokens=16, embed=EMBED)
    image_cache().clear()
    m = ModelManager(
        ModelRegistry([model_dir], platform=None),
        library=sim_lib,
        rknn_library=rknn_lib,
        preflight=False,
        max_loaded=2,
        memory_budget_mb=None,
    )
    yield m
    m.close()
    image_cache().clear()
    assert sim.counter("multimodal_violations") == 0, "a multimodal input the runtime refuses was sent"


@pytest.fixture
def image_server() -> Iterator[Callable[[bytes], str]]:
    """A local HTTP server handing out images; returns the URL of each image given to it."""
    images: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = images.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def publish(data: bytes) -> str:
        path = f"/image-{len(images)}.png"
        images[path] = data
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield publish
    server.shutdown()
    thread.join(10)
    server.server_close()


# -- LangChain ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "block",
    [
        {"type": "image", "base64": RED_B64, "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{RED_B64}"}},
        {"type": "image", "source_type": "base64", "data": RED_B64, "mime_type": "image/png"},
    ],
    ids=["v1-base64", "openai-image-url", "source-type"],
)
def test_chat_rkllm_answers_about_a_red_image(manager: ModelManager, block: dict[str, Any]) -> None:
    model = ChatRKLLM(model=VL, manager=manager)
    reply = model.invoke([HumanMessage([{"type": "text", "text": "What is in this picture?"}, block])])
    assert isinstance(reply, AIMessage) and str(reply.content).startswith("I see a mostly red image.")


def test_chat_rkllm_streams_and_continues_a_conversation_with_an_image(manager: ModelManager) -> None:
    model = ChatRKLLM(model=VL, manager=manager)
    first = HumanMessage([{"type": "image", "base64": RED_B64, "mime_type": "image/png"}, "What colour?"])
    streamed = "".join(chunk.text for chunk in model.stream([first]))
    assert streamed.startswith("I see a mostly red image.")
    reply = model.invoke([first, AIMessage(streamed), HumanMessage("Are you sure?")])
    assert reply.response_metadata["kv_reused"] is True


def test_chat_rkllm_fetches_a_remote_image_only_when_allowed(
    manager: ModelManager, image_server: Callable[[bytes], str]
) -> None:
    url = image_server(png(BLUE))
    message = [HumanMessage([{"type": "image", "url": url}, "What colour?"])]
    with pytest.raises(ValueError, match="fetching image URLs is turned off"):
        ChatRKLLM(model=VL, manager=manager).invoke(message)
    reply = ChatRKLLM(model=VL, manager=manager, allow_remote_images=True).invoke(message)
    assert str(reply.content).startswith("I see a mostly blue image.")


# -- LlamaIndex --------------------------------------------------------------------------------------------------
def test_llamaindex_rkllm_answers_about_image_blocks_of_bytes_and_paths(manager: ModelManager, tmp_path: Path) -> None:
    llm = RKLLM(VL, manager=manager)
    photo = tmp_path / "photo.png"
    photo.write_bytes(png(RED))
    for image in (ImageBlock(image=png(RED)), ImageBlock(path=photo)):
        message = ChatMessage(role=MessageRole.USER, blocks=[image, TextBlock(text="What is in this picture?")])
        reply = llm.chat([message])
        assert (reply.message.content or "").startswith("I see a mostly red image.")


def test_llamaindex_rkllm_streams_async_with_an_image_url(manager: ModelManager) -> None:
    llm = RKLLM(VL, manager=manager)
    block = ImageBlock(url=f"data:image/png;base64,{RED_B64}")
    message = ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Colour?"), block])

    async def collect() -> str:
        text = ""
        async for part in await llm.astream_chat([message]):
            text += part.delta or ""
        return text

    assert asyncio.run(collect()).startswith("I see a mostly red image.")


# -- the server ----------------------------------------------------------------------------------------------------
def asgi(manager: ModelManager, **settings: Any) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=create_app(manager, ServerSettings(board="board-v", **settings)))


def test_the_openai_client_sends_an_image_url(manager: ModelManager) -> None:
    openai = pytest.importorskip("openai")

    async def ask() -> str | None:
        async with httpx.AsyncClient(transport=asgi(manager), base_url="http://test") as http:
            client = openai.AsyncOpenAI(api_key="none", base_url="http://test/v1", http_client=http, max_retries=0)
            content = [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{RED_B64}"}},
            ]
            reply = await client.chat.completions.create(model=VL, messages=[{"role": "user", "content": content}])
            return reply.choices[0].message.content  # type: ignore[no-any-return]

    assert (asyncio.run(ask()) or "").startswith("I see a mostly red image.")


def test_the_server_fetches_remote_images_only_with_the_flag(
    manager: ModelManager, image_server: Callable[[bytes], str]
) -> None:
    url = image_server(png(BLUE))
    body = {"model": VL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}

    async def post(**settings: Any) -> httpx.Response:
        async with httpx.AsyncClient(transport=asgi(manager, **settings), base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json=body)

    refused = asyncio.run(post())
    assert refused.status_code == 400 and "--allow-remote-images" in refused.json()["error"]["message"]
    answered = asyncio.run(post(allow_remote_images=True))
    assert answered.status_code == 200
    assert answered.json()["choices"][0]["message"]["content"].startswith("I see a mostly blue image.")


def test_the_ollama_client_sends_images(manager: ModelManager) -> None:
    ollama = pytest.importorskip("ollama")

    async def ask() -> tuple[str, str]:
        client = ollama.AsyncClient(host="http://test", transport=asgi(manager))
        chat = await client.chat(
            model=VL, messages=[{"role": "user", "content": "What is in this picture?", "images": [png(RED)]}]
        )
        generated = await client.generate(model=VL, prompt="Colour?", images=[RED_B64])
        return chat.message.content or "", generated.response

    chat, generated = asyncio.run(ask())
    assert chat.startswith("I see a mostly red image.") and generated.startswith("I see a mostly red image.")


def test_an_image_over_the_servers_limit_is_a_400(manager: ModelManager) -> None:
    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=asgi(manager, max_image_bytes=100), base_url="http://test") as http:
            return await http.post(
                "/api/chat", json={"model": VL, "messages": [{"role": "user", "content": "?", "images": [RED_B64]}]}
            )

    response = asyncio.run(post())
    assert response.status_code == 400 and "image limit of 100 bytes" in response.json()["error"]


def test_an_image_the_model_side_cannot_use_is_a_400_on_both_apis(
    manager: ModelManager, image_server: Callable[[bytes], str], rknn_sim: RKNNSimulatorControl
) -> None:
    not_an_image = base64.b64encode(b"these bytes are no picture").decode()
    truncated = base64.b64encode(png(RED)[:40]).decode()
    missing = image_server(png(RED)).replace(".png", "-missing.png")  # the local server answers 404

    async def post(path: str, body: dict[str, Any]) -> httpx.Response:
        transport = asgi(manager, allow_remote_images=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post(path, json=body)

    def openai_body(url: str) -> dict[str, Any]:
        return {
            "model": VL,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        }

    for data in (not_an_image, truncated):
        reply = asyncio.run(post("/api/chat", {"model": VL, "messages": [{"role": "user", "images": [data]}]}))
        assert reply.status_code == 400 and "image" in reply.json()["error"]
        reply = asyncio.run(post("/v1/chat/completions", openai_body(f"data:image/png;base64,{data}")))
        assert reply.status_code == 400 and "image" in reply.json()["error"]["message"]
    reply = asyncio.run(post("/v1/chat/completions", openai_body(missing)))
    assert reply.status_code == 400 and "-missing.png" in reply.json()["error"]["message"]
    assert rknn_sim.counter("runs") == 0  # nothing reached the encoder


def test_one_image_reaches_the_engine_as_the_same_message_from_every_form() -> None:
    data_url = f"data:image/png;base64,{RED_B64}"
    forms = [
        from_langchain([HumanMessage([{"type": "image", "base64": RED_B64, "mime_type": "image/png"}, "Colour?"])]),
        from_langchain([HumanMessage([{"type": "image_url", "image_url": {"url": data_url}}, "Colour?"])]),
        from_llamaindex(
            [ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(image=png(RED)), TextBlock(text="Colour?")])]
        ),
        wire.chat_request(
            {
                "model": VL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url}},
                            {"type": "text", "text": "Colour?"},
                        ],
                    }
                ],
            }
        ).messages,
        ollama_wire.chat_request(
            {"model": VL, "messages": [{"role": "user", "content": "Colour?", "images": [RED_B64]}]}
        ).messages,
    ]
    assert all(form == forms[0] for form in forms), forms
    assert [m.fingerprint() for m in forms[0]] == [m.fingerprint() for m in forms[-1]]  # one KV-cache identity
