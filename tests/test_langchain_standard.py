"""LangChain's standard chat-model test suites (langchain-tests 1.1.9) for ChatRKLLM.

The unit suite constructs models with paths that do not exist (constructing must
not touch them); the integration suite runs against the simulator (ABI 1.3) with
two model files, so the per-call model override swaps models.

Every test runs. The only expected failures are the input modalities the runtime
cannot take (images, PDFs, audio): those tests are replaced by checks that
ChatRKLLM refuses each format with ``UnsupportedContentError``, marked
``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_rkllm import ChatRKLLM, UnsupportedContentError
from rkllm_core.errors import ModelKindError
from rkllm_core.models.manager import manager_for
from rkllm_core.sim import make_model

MODEL = "qwen3-0.6b"
OTHER_MODEL = "qwen2.5-0.5b"

_SIM: dict[str, str] = {}

# A 1x1 PNG, and a few bytes standing in for a PDF and a WAV file: the data never reaches the runtime.
_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
        "c0f01f0005000201a5d1c2e00000000049454e44ae426082"
    )
).decode()
_PDF = base64.b64encode(b"%PDF-1.4\n%%EOF\n").decode()
_WAV = base64.b64encode(b"RIFF$\x00\x00\x00WAVEfmt ").decode()

_NO_IMAGES = "images are translated, but this suite's model is a text model: the chat engine refuses the image"
_NO_TOOL_IMAGES = "images go in user messages only: an image in a tool result is refused with UnsupportedContentError"
_NO_PDF = "the RKLLM runtime takes text only: file (PDF) content is refused with UnsupportedContentError"
_NO_AUDIO = "the RKLLM runtime takes text only: audio content is refused with UnsupportedContentError"


@pytest.fixture(scope="module", autouse=True)
def simulator_env(sim_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The 1.3 simulator, a model directory with two models, and a private prompt-cache directory."""
    models = tmp_path_factory.mktemp("lc-std-models")
    make_model(models, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
    make_model(models, "Qwen_Qwen2.5-0.5B-Instruct-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm", think=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path_factory.mktemp("lc-std-pcache")))
    mp.setenv("RKLLM_SIM_TOKEN_DELAY_MS", "0")
    _SIM.update(model_dir=str(models), library_path=str(sim_paths["1.3"]))
    yield
    # Every model built from these params shares one manager: close its handles (no leaks for later tests).
    manager_for(_SIM["model_dir"], _SIM["library_path"]).close()
    mp.undo()
    _SIM.clear()


class TestChatRKLLMUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatRKLLM]:
        return ChatRKLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Paths that do not exist: constructing a model must not load or read anything.
        return {
            "model": MODEL,
            "model_dir": "/nonexistent/rkllm-models",
            "library_path": "/nonexistent/librkllmrt.so",
        }

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"RKLLM_MODEL": OTHER_MODEL}, {}, {"model": OTHER_MODEL}

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestChatRKLLMIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatRKLLM]:
        return ChatRKLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": MODEL, **_SIM}

    @property
    def model_override_value(self) -> str:
        return OTHER_MODEL

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True  # text blocks with cache_control, tool_use and thinking blocks in history

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:  # type: ignore[override]
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    @property
    def enable_vcr_tests(self) -> bool:
        # The runtime runs in-process: there is no HTTP traffic to record, so the VCR cassette stays empty
        # and test_stream_time simply times a stream.
        return True

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A second turn that continues the first: its prefix comes from the KV cache."""
        model = ChatRKLLM(**self.chat_model_params)
        history: list[Any] = [HumanMessage("Tell me about the Rockchip NPU.")]
        history.append(model.invoke(history))
        history.append(HumanMessage("And about its memory?"))
        if not stream:
            reply = model.invoke(history)
        else:
            full = None
            for chunk in model.stream(history):
                full = chunk if full is None else full + chunk
            assert full is not None
            reply = full
        assert reply.usage_metadata is not None
        assert reply.usage_metadata["input_token_details"]["cache_read"] > 0
        return reply

    # -- modalities the runtime cannot take ----------------------------------------------------------------------
    @pytest.mark.xfail(reason=_NO_IMAGES, raises=ModelKindError, strict=True)
    def test_image_inputs(self, model: BaseChatModel) -> None:
        for content in (
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_PNG}"}},
            {"type": "image", "base64": _PNG, "mime_type": "image/png"},
        ):
            with pytest.raises(ModelKindError, match="image") as info:
                model.invoke([HumanMessage([{"type": "text", "text": "Describe this image."}, content])])
        raise info.value

    @pytest.mark.xfail(reason=_NO_TOOL_IMAGES, raises=UnsupportedContentError, strict=True)
    def test_image_tool_message(self, model: BaseChatModel) -> None:
        def random_image() -> str:
            """Return a random image."""
            return ""

        call = AIMessage([], tool_calls=[{"type": "tool_call", "id": "1", "name": "random_image", "args": {}}])
        for content in (
            [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_PNG}"}}],
            [{"type": "image", "base64": _PNG, "mime_type": "image/png"}],
        ):
            result = ToolMessage(content=content, tool_call_id="1", name="random_image")  # type: ignore[arg-type]
            _refused(
                model.bind_tools([random_image]), [[HumanMessage("Describe a random image."), call, result]], "image"
            )

    @pytest.mark.xfail(reason=_NO_PDF, raises=UnsupportedContentError, strict=True)
    def test_pdf_inputs(self, model: BaseChatModel) -> None:
        _refused(
            model,
            [
                HumanMessage(
                    [
                        {"type": "text", "text": "Summarize this document:"},
                        {"type": "file", "base64": _PDF, "mime_type": "application/pdf"},
                    ]
                ),
                HumanMessage(
                    [
                        {"type": "text", "text": "Summarize this document:"},
                        {
                            "type": "file",
                            "file": {"filename": "test.pdf", "file_data": f"data:application/pdf;base64,{_PDF}"},
                        },
                    ]
                ),
            ],
            "file",
        )

    @pytest.mark.xfail(reason=_NO_PDF, raises=UnsupportedContentError, strict=True)
    def test_pdf_tool_message(self, model: BaseChatModel) -> None:
        def random_pdf() -> str:
            """Return a random PDF."""
            return ""

        call = AIMessage([], tool_calls=[{"type": "tool_call", "id": "1", "name": "random_pdf", "args": {}}])
        result = ToolMessage(
            content_blocks=[{"type": "file", "base64": _PDF, "mime_type": "application/pdf"}],
            tool_call_id="1",
            name="random_pdf",
        )
        _refused(model.bind_tools([random_pdf]), [[HumanMessage("Relay the title of a PDF."), call, result]], "file")

    @pytest.mark.xfail(reason=_NO_AUDIO, raises=UnsupportedContentError, strict=True)
    def test_audio_inputs(self, model: BaseChatModel) -> None:
        _refused(
            model,
            [
                HumanMessage(
                    [
                        {"type": "text", "text": "Describe this audio:"},
                        {"type": "audio", "mime_type": "audio/wav", "base64": _WAV},
                    ]
                ),
                HumanMessage(
                    [
                        {"type": "text", "text": "Describe this audio:"},
                        {"type": "input_audio", "input_audio": {"data": _WAV, "format": "wav"}},
                    ]
                ),
            ],
            "audio",
        )


def _refused(model: Any, requests: list[Any], modality: str) -> None:
    """Each request (a message or a list of messages) must be refused for ``modality``; re-raise the refusal."""
    error: UnsupportedContentError | None = None
    for request in requests:
        with pytest.raises(UnsupportedContentError) as info:
            model.invoke(request if isinstance(request, list) else [request])
        assert info.value.modality == modality and modality in str(info.value)
        error = info.value
    assert error is not None
    raise error
