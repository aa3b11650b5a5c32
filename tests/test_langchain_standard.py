"""LangChain's standard chat-model test suites (langchain-tests 1.1.9) for ChatRKLLM.

The unit suite constructs models with paths that do not exist (constructing must
not touch them); the integration suite runs on both ABIs' simulators with a vision
model (a Qwen2.5-VL file beside its image encoder, on the RKNN simulator), so the image
tests run for real, and a text model the per-call model override swaps to. The suite's
test image, which it downloads with ``httpx.get``, is made here instead (no network);
image URLs are not tested by the suite (it would fetch a GitHub URL), but by
``tests/test_images_e2e.py`` against a local server.

Every test runs. The only expected failures are the inputs ChatRKLLM cannot take
(PDFs, audio, and images in tool results): those tests are replaced by checks that
ChatRKLLM refuses each with ``UnsupportedContentError``, marked ``xfail(strict=True)``
with the reason.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from PIL import Image

from langchain_rkllm import ChatRKLLM, UnsupportedContentError
from rkllm_core.models.manager import manager_for
from rkllm_core.sim import make_encoder, make_model
from tests import rknn_fixtures

rknn_sim_path = rknn_fixtures.rknn_sim_path

MODEL = "qwen3-0.6b"
OTHER_MODEL = "qwen2.5-0.5b"
VL_MODEL = "qwen2.5-vl-3b"

_SIM: dict[str, str] = {}
_SIM_12: dict[str, str] = {}

# A 1x1 PNG, and a few bytes standing in for a PDF and a WAV file: the data never reaches the runtime.
_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
        "c0f01f0005000201a5d1c2e00000000049454e44ae426082"
    )
).decode()
_PDF = base64.b64encode(b"%PDF-1.4\n%%EOF\n").decode()
_WAV = base64.b64encode(b"RIFF$\x00\x00\x00WAVEfmt ").decode()

_NO_TOOL_IMAGES = "images go in user messages only: an image in a tool result is refused with UnsupportedContentError"
_NO_PDF = "the RKLLM runtime takes text and images only: file (PDF) content is refused with UnsupportedContentError"
_NO_AUDIO = "the RKLLM runtime takes text and images only: audio content is refused with UnsupportedContentError"


@pytest.fixture(scope="module", autouse=True)
def simulator_env(
    sim_paths: dict[str, Path], rknn_sim_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The simulators, a model directory with two text models and a vision model beside its image encoder,
    and a private prompt-cache directory."""
    models = tmp_path_factory.mktemp("lc-std-models")
    make_model(models, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
    make_model(models, "Qwen_Qwen2.5-0.5B-Instruct-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm", think=False)
    make_model(models, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=6, think=False)
    make_encoder(models, "qwen2.5-vl-3b_vision_rk3588.rknn", height=32, width=32, tokens=16, embed=6)
    mp = pytest.MonkeyPatch()
    mp.setenv("RKNN_LIB_PATH", str(rknn_sim_path))
    mp.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path_factory.mktemp("lc-std-pcache")))
    mp.setenv("RKLLM_SIM_TOKEN_DELAY_MS", "0")
    _SIM.update(model_dir=str(models), library_path=str(sim_paths["1.3"]))
    _SIM_12.update(model_dir=str(models), library_path=str(sim_paths["1.2"]))
    yield
    # Every model built from these params shares one manager: close its handles (no leaks for later tests).
    for params in (_SIM, _SIM_12):
        manager_for(params["model_dir"], params["library_path"]).close()
    mp.undo()
    _SIM.clear()
    _SIM_12.clear()


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
        return {"model": VL_MODEL, **_SIM}  # a vision model: the whole suite, images included, runs on it

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
    @property
    def supports_image_inputs(self) -> bool:
        return True

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


class TestChatRKLLMIntegrationABI12(TestChatRKLLMIntegration):
    """The same suite on the 1.2 ABI (images set their tags at init there, sampling is per instance)."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": VL_MODEL, **_SIM_12}


@pytest.fixture(autouse=True)
def offline_suite_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answer the suite's ``httpx.get`` of its test image with a PNG made here (tests never use the network)."""
    image = io.BytesIO()
    Image.new("RGB", (64, 48), (230, 20, 20)).save(image, "PNG")

    def get(url: str, **_: Any) -> httpx.Response:
        return httpx.Response(200, content=image.getvalue(), request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", get)


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
