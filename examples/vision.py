"""A vision-language model answers about an image, through LangChain and through LlamaIndex.

Usage:
    python examples/vision.py [IMAGE]

Without IMAGE a small picture is drawn here with Pillow (no network). The image goes to the model
in each framework's own form: a LangChain image content block to ``ChatRKLLM``, a LlamaIndex
``ImageBlock`` to ``RKLLM``. The ``.rknn`` encoder beside the model turns it into image tokens on
the NPU (loaded once, kept with the model); the follow-up question reuses the KV cache, so the
image is not encoded or prefilled again. Without a board both runtimes are simulated, and the
simulated model names the dominant colour of the image instead of describing it.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

from _setup import setup, vision_model
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from PIL import Image, ImageDraw

from langchain_rkllm import ChatRKLLM
from llamaindex_rkllm import RKLLM


def draw_picture() -> bytes:
    """A red square with a small white sun, as PNG bytes."""
    image = Image.new("RGB", (320, 240), (200, 30, 30))
    ImageDraw.Draw(image).ellipse((230, 20, 290, 80), fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def with_langchain(model: str, picture: bytes) -> None:
    """Ask about the picture with a LangChain image block, then follow up without resending it."""
    chat = ChatRKLLM(model=model, max_tokens=128)
    block = {"type": "image", "base64": base64.b64encode(picture).decode(), "mime_type": "image/png"}
    history: list[BaseMessage] = [HumanMessage([block, {"type": "text", "text": "What is in this picture?"}])]
    reply = chat.invoke(history)
    print(f"[langchain] {reply.text}")
    history += [AIMessage(reply.text), HumanMessage("Describe its colours in one word.")]
    again = chat.invoke(history)
    meta = again.response_metadata
    print(f"[langchain] {again.text}")
    print(f"[langchain follow-up: prefilled {meta['prefilled_tokens']} tokens, KV reused: {meta['kv_reused']}]")


def with_llamaindex(model: str, picture: bytes) -> None:
    """Ask about the picture with a LlamaIndex ImageBlock."""
    llm = RKLLM(model, max_tokens=128)
    message = ChatMessage(
        role=MessageRole.USER, blocks=[ImageBlock(image=picture), TextBlock(text="What is in this picture?")]
    )
    reply = llm.chat([message])
    print(f"[llamaindex] {reply.message.content}")


def main(argv: list[str]) -> int:
    env = setup()
    model = vision_model(env)
    picture = Path(argv[0]).read_bytes() if argv else draw_picture()
    with_langchain(model, picture)
    with_llamaindex(model, picture)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
