"""A chat template set for a model in rkllm-models.toml is the one the engine installs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.options import ChatOptions
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

TOML = """
[models."qwen3-0.6b"]
chat_template = {{ system = "{system}", prefix = "[[U]]", postfix = "[[/U]][[A]]" }}
"""

TOOL = {
    "type": "function",
    "function": {"name": "lookup", "description": "Look it up.", "parameters": {"type": "object", "properties": {}}},
}


def engine_for(model_dir: Path, sim_lib: RuntimeLibrary, system: str) -> Iterator[ChatEngine]:
    make_model(model_dir, "Qwen3-0.6B-w8a8-rk3588.rkllm")
    (model_dir / "rkllm-models.toml").write_text(TOML.format(system=system), encoding="utf-8")
    manager = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib)
    yield ChatEngine(manager=manager, prompt_cache=False)
    manager.close()


@pytest.fixture
def engine(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ChatEngine]:
    yield from engine_for(model_dir, sim_lib, "<<SYS>>{system}<</SYS>>")


@pytest.fixture
def fixed_engine(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ChatEngine]:
    yield from engine_for(model_dir, sim_lib, "<<SYS>>Be brief.<</SYS>>")


def installed(sim: SimulatorControl) -> list[dict[str, str]]:
    return [t for t in sim.trace() if t["fn"] == "rkllm_set_chat_template"]


def test_the_registry_template_is_installed_with_the_system_prompt_in_its_slot(
    engine: ChatEngine, sim: SimulatorControl
) -> None:
    sim.set("trace", 2)
    msgs = [ChatMessage("system", "Answer in French."), ChatMessage("user", "hello")]
    reply = engine.chat("qwen3-0.6b", msgs)
    (call,) = installed(sim)
    assert call["system_prompt"] == "<<SYS>>Answer in French.<</SYS>>"
    assert (call["prompt_prefix"], call["prompt_postfix"]) == ("[[U]]", "[[/U]][[A]]")
    prefilled = [t for t in sim.trace() if t["fn"] == "prefilled"][-1]
    assert "[[U]]hello[[/U]][[A]]" in str(prefilled)
    assert "<|im_start|>" not in str(prefilled)  # not the family's ChatML
    # the next turn continues in the KV cache under the same template
    msgs += [reply.message, ChatMessage("user", "and again")]
    again = engine.chat("qwen3-0.6b", msgs)
    assert again.kv_reused and len(installed(sim)) == 1


def test_earlier_turns_go_into_the_system_slot_on_a_rebuild(engine: ChatEngine, sim: SimulatorControl) -> None:
    sim.set("trace", 1)
    msgs = [
        ChatMessage("user", "first question"),
        ChatMessage("assistant", "first answer"),
        ChatMessage("user", "second question"),
    ]
    engine.chat("qwen3-0.6b", msgs)
    slot = installed(sim)[-1]["system_prompt"]
    assert slot.startswith("<<SYS>>You are a helpful assistant.") and slot.endswith("<</SYS>>")
    assert "first question" in slot and "first answer" in slot


def test_a_template_without_a_placeholder_keeps_its_own_system_text(
    fixed_engine: ChatEngine, sim: SimulatorControl
) -> None:
    sim.set("trace", 1)
    fixed_engine.chat("qwen3-0.6b", [ChatMessage("user", "hello")])
    assert installed(sim)[-1]["system_prompt"] == "<<SYS>>Be brief.<</SYS>>"
    fixed_engine.chat("qwen3-0.6b", [ChatMessage("system", "Answer in French."), ChatMessage("user", "hello")])
    assert installed(sim)[-1]["system_prompt"] == "<<SYS>>Be brief.<</SYS>>Answer in French."


def test_tools_use_the_runtimes_function_calling_set_up(engine: ChatEngine, sim: SimulatorControl) -> None:
    sim.set("trace", 1)
    engine.chat("qwen3-0.6b", [ChatMessage("user", "hello")], ChatOptions(tools=(TOOL,)))
    assert not installed(sim)
    assert any(t["fn"] == "rkllm_set_function_tools" for t in sim.trace())
