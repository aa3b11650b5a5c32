"""``rkllm doctor``: a short validation a user with a board runs once and pastes into an issue.

Steps: struct layouts, library and ABI (what was verified and what is
assumed), the pre-flight checks (memory, NPU driver, CPU), init, stream, abort
mid-stream, a swap between two models, prompt-cache save and load. The
generation steps use chat models; an embedding or reranker model among the
models gets an embedding (or reranking) step instead. Each step passes, fails
(with the error), warns, or is skipped (with the reason); on the simulator the
same steps run against simulated models.

With ``batch=True`` (``rkllm doctor --batch``) one more step checks batched decoding
(``n_batch``, experimental): a few short prompts are answered one by one, then together
in one batched run, both greedily (``top_k = 1``) on fresh handles, and every batched
answer must equal its single-run answer — the board check that this runtime's batching
behaves as its manual documents.

A vision model among the models gets a vision step: its image encoder is loaded with it,
the RKNN runtime's SDK and driver versions and the encoder's geometry (input size and
layout, image tokens, embedding width, outputs) are shown, a small generated image is
encoded (timed), and one multimodal chat turn runs. A vision model without an encoder is
skipped with the reason (it serves text only).
"""

from __future__ import annotations

import ctypes
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from .. import preflight
from ..models.manager import ModelManager
from ..models.registry import CHAT_KINDS, ModelInfo, ModelRegistry
from ..native import functions, structs
from ..params import InitParams, SamplingParams
from ..runtime import RKLLMRuntime

__all__ = ["CheckResult", "EXPECTED_SIZES", "run_doctor"]

# The header sizes the ctypes mirrors are checked against (kept in the native layer; re-exported).
EXPECTED_SIZES = structs.HEADER_SIZES


@dataclass
class CheckResult:
    """One step of the validation."""

    name: str
    status: str  # "PASS", "FAIL", "WARN" or "SKIP"
    detail: str = ""
    seconds: float = 0.0


def check_layouts() -> str:
    """Compare the ctypes mirrors with the header sizes for this pointer width; raise on a mismatch."""
    width = ctypes.sizeof(ctypes.c_void_p)
    problems = []
    for abi, by_width in structs.HEADER_SIZES.items():
        module = functions.abi_module(abi)
        for struct, size in by_width[width].items():
            cls = getattr(module, struct, None) or getattr(structs, struct)
            if ctypes.sizeof(cls) != size:
                problems.append(f"ABI {abi} {struct}: {ctypes.sizeof(cls)} bytes, header says {size}")
    if problems:
        raise AssertionError("; ".join(problems))
    return f"{sum(len(v[width]) for v in structs.HEADER_SIZES.values())} structs match ({width * 8}-bit)"


def run_doctor(
    manager: ModelManager,
    models: Sequence[str] = (),
    *,
    work_dir: str | Path | None = None,
    batch: bool = False,
) -> list[CheckResult]:
    """Run every step and return the results (never raises for a failing step).

    ``batch`` adds the batched-decoding step (see the module docs).
    """
    checkup = _Checkup(manager, models, work_dir)
    checkup.step("struct layouts", check_layouts)
    if checkup.step("runtime library and ABI", checkup.library) and checkup.step("models", checkup.pick):
        checkup.preflight()
        if not checkup.model:
            checkup.results.append(CheckResult(_CHAT_STEPS, "SKIP", checkup.no_chat_model()))
        elif checkup.step("init", checkup.init):
            checkup.step("stream", checkup.stream)
            checkup.step("abort mid-stream", checkup.abort)
            checkup.step("swap between two models", checkup.swap)
            checkup.step("prompt cache save and load", checkup.prompt_cache)
            if batch:
                checkup.step(f"batched run (n_batch={len(BATCH_PROMPTS)})", checkup.batch)
        for info in checkup.retrieval:
            step = "embedding" if info.kind == "embedding" else "reranking"
            checkup.step(f"{step} ({info.name})", partial(checkup.retrieve, info))
        if checkup.vision is not None:
            checkup.step(f"vision ({checkup.vision.name})", partial(checkup.see, checkup.vision))
    return checkup.results


_CHAT_STEPS = "init, stream, abort, swap, prompt cache"
BATCH_PROMPTS = ("Reply with the word one.", "Name a colour.", "What is 2 + 3? count to 5")
"""The short prompts of the batched-run step: answered singly, then in one batched run."""


class _Checkup:
    """The steps of one doctor run on one manager; each returns its detail line or raises."""

    def __init__(self, manager: ModelManager, models: Sequence[str], work_dir: str | Path | None) -> None:
        self.manager = manager
        self.requested = list(models)
        self.work_dir = work_dir
        self.results: list[CheckResult] = []
        self.names: list[str] = []  # the chat models to use
        self.model = ""  # the first of them ("" when there is none)
        self.others: list[ModelInfo] = []  # the models that are not chat models
        self.retrieval: list[ModelInfo] = []  # the first embedding and the first reranker model
        self.vision: ModelInfo | None = None  # the first vision model (with an encoder if there is one)

    def step(self, name: str, fn: Callable[[], str]) -> bool:
        """Run one step and record its result; False when it failed."""
        t0 = time.perf_counter()
        try:
            detail = fn()
            status = "SKIP" if detail.startswith("skipped") else "PASS"
        except Exception as exc:  # a failing step is reported, the others still run
            detail = f"{type(exc).__name__}: {exc}"
            if not str(exc):
                detail += " " + traceback.format_exc(limit=2).splitlines()[-2].strip()
            status = "FAIL"
        self.results.append(CheckResult(name, status, detail, time.perf_counter() - t0))
        return status != "FAIL"

    def library(self) -> str:
        lib = self.manager.library
        kind = "SIMULATOR " if lib.is_simulator else ""
        checked = "assumed: " + "; ".join(lib.assumed) if lib.assumed else "verified: " + lib.abi_reason
        if lib.backend.per_run_sampling:
            runs = "sampling and max_new_tokens are per run"
        else:
            runs = (
                "sampling is fixed at rkllm_init (served by the manager's sampling policy, "
                f"{self.manager.sampling_policy!r}); max_new_tokens per run is enforced by the binding"
            )
        return f"{kind}{lib.path} ABI {lib.abi}, version {lib.version or 'unknown'}; {checked}; {runs}"

    def pick(self) -> str:
        if self.requested:
            infos = [self.manager.resolve(name) for name in self.requested]
        else:
            infos = self.manager.registry.models()
        if not infos:
            dirs = ", ".join(str(d) for d in self.manager.registry.model_dirs)
            raise LookupError(f"no models found (searched {dirs}); pass a model or set RKLLM_MODEL_DIR")
        self.names = [info.name for info in infos if info.kind in CHAT_KINDS]
        self.model = self.names[0] if self.names else ""
        self.others = [info for info in infos if info.kind not in CHAT_KINDS]
        firsts = {info.kind: info for info in reversed(self.others) if info.kind in ("embedding", "reranker")}
        self.retrieval = sorted(firsts.values(), key=self.others.index)
        visions = [info for info in infos if info.kind == "vision"]
        self.vision = next((info for info in visions if info.encoder is not None), visions[0] if visions else None)
        used = f"using {self.model}" if self.model else "no chat model"
        if len(self.names) > 1:
            used += f", second model {self.names[1]}"
        if self.retrieval:
            used += "; " + ", ".join(f"{info.kind} model {info.name}" for info in self.retrieval)
        return used

    def no_chat_model(self) -> str:
        """Why the generation steps are skipped."""
        listed = ", ".join(f"{info.name} ({info.kind})" for info in self.others)
        return f"skipped: no chat model among {listed}; pass a chat model to run them"

    def retrieve(self, info: ModelInfo) -> str:
        """Embed two texts with an embedding model, or score two documents with a reranker."""
        from ..embed import EmbeddingEngine

        engine = EmbeddingEngine(self.manager)
        if info.kind == "embedding":
            vectors = engine.embed(info.name, ["the sky is blue", "birds fly over the hills"]).vectors
            if len(vectors) != 2 or not vectors[0] or len(vectors[0]) != len(vectors[1]):
                raise AssertionError(f"expected two vectors of one size, got {[len(v) for v in vectors]}")
            return f"2 texts embedded, {len(vectors[0])} dimensions"
        scores = engine.rerank(info.name, "where do birds fly?", ["birds fly over the hills", "the sea is wide"]).scores
        if len(scores) != 2:
            raise AssertionError(f"expected two scores, got {scores}")
        return f"2 documents scored: {scores[0]:.3f}, {scores[1]:.3f}"

    def see(self, info: ModelInfo) -> str:
        """Load a vision model's encoder, show its versions and geometry, encode an image, run one image turn."""
        if info.encoder is None:
            return (
                f"skipped: {info.name} has no image encoder (put its .rknn beside the .rkllm, or set "
                "vision_encoder in the registry file); it serves text only"
            )
        try:
            picture = _test_picture()
        except ImportError:
            return "skipped: Pillow is not installed (pip install 'boardllm[vision]')"
        with self.manager.lease(info.name) as lease:
            encoder = lease.encoder
            if encoder is None:
                raise AssertionError(f"{info.name} loaded without its encoder {info.encoder.name}")
            t0 = time.perf_counter()
            embedding = encoder.encode_image(picture)
            took_ms = (time.perf_counter() - t0) * 1000
            g, sdk = encoder.geometry, encoder.sdk_version
        if embedding.n_tokens != g.n_tokens or embedding.width != g.row_width:
            raise AssertionError(f"embedding {embedding.n_tokens}x{embedding.width}, geometry says {g}")
        answer = _image_turn(self.manager, info.name, picture)
        return (
            f"{info.encoder.name}: RKNN API {sdk.api}, driver {sdk.driver}; input {g.height}x{g.width} {g.layout}, "
            f"{g.n_tokens} tokens x {g.embed_width} x {g.n_outputs} output(s); encoded in {took_ms:.0f} ms; "
            f"answer: {answer[:60]!r}"
        )

    def preflight(self) -> None:
        """One result per pre-flight finding (memory, NPU driver, CPU) for the first model."""
        lib = self.manager.library
        note = " (the simulator: not applied when loading)" if lib.is_simulator else ""
        first = self.manager.resolve(self.model) if self.model else self.others[0]
        for finding in preflight.check(first.path, lib.version):
            status = {"ok": "PASS", "problem": "FAIL", "warning": "WARN", "unknown": "SKIP"}[finding.status]
            detail = ("unknown: " if finding.status == "unknown" else "") + finding.detail + note
            self.results.append(CheckResult(f"pre-flight: {finding.check}", status, detail))

    def init(self) -> str:
        t0 = time.perf_counter()
        with self.manager.lease(self.model) as lease:
            took = time.perf_counter() - t0
            return f"{lease.info.filename} loaded in {took:.2f} s (context {lease.runtime.max_context_len})"

    def stream(self) -> str:
        with self.manager.lease(self.model) as lease:
            s = lease.runtime.stream("Say hello in one short sentence.")
            chunks = list(s)
        text = "".join(c.text for c in chunks).strip()
        if not text:
            raise AssertionError("the model produced no text")
        stats = chunks[-1].stats
        rate = f", {stats.decode_tokens_per_s:.1f} tok/s" if stats else ", no perf stats"
        return f"{len(chunks) - 1} chunks, finish {chunks[-1].finish_reason}{rate}: {text[:60]!r}"

    def abort(self) -> str:
        with self.manager.lease(self.model) as lease:
            rt = lease.runtime
            s = rt.stream("Count from 1 to 10000, numbers separated by spaces. count to 10000")
            got = 0
            for chunk in s:
                if chunk.is_final:
                    break
                got += 1
                if got == 3:
                    s.abort()
            if s.finish_reason != "abort":
                raise AssertionError(f"the run ended with {s.finish_reason!r} instead of 'abort'")
            again = rt.generate("Reply with OK.")
            if not again.text.strip():
                raise AssertionError("no text after the abort")
        return f"aborted after {got} chunks; the next run answered"

    def swap(self) -> str:
        if len(self.names) < 2:
            return "skipped: only one model available (pass two models to test a swap)"
        model, other = self.model, self.manager.resolve(self.names[1]).name
        with self.manager.lease(other) as lease:
            lease.runtime.generate("Hi.")
        with self.manager.lease(model) as lease:
            lease.runtime.generate("Hi.")
        loaded = [e.info.name for e in self.manager.loaded()]
        if self.manager.max_loaded == 1 and loaded != [model]:
            raise AssertionError(f"expected only {model} loaded after the swap, found {loaded}")
        return f"{model} → {other} → {model}; loaded now: {', '.join(loaded)}"

    def batch(self) -> str:
        """Answer :data:`BATCH_PROMPTS` singly, then in one batched run (greedy, fresh handles); compare."""
        info = self.manager.resolve(self.model)
        self.manager.unload(info.name)  # room for the test handles: one at a time
        lib = self.manager.library
        params = InitParams(
            max_context_len=min(1024, info.context_size), max_new_tokens=24, sampling=SamplingParams(top_k=1)
        )
        with RKLLMRuntime(info.path, params=params, library=lib) as rt:
            singles = [rt.generate(p).text for p in BATCH_PROMPTS]
        with RKLLMRuntime(info.path, params=replace(params, n_batch=len(BATCH_PROMPTS)), library=lib) as rt:
            with rt.batch(BATCH_PROMPTS) as run:
                answers = ["".join(c.text for c in slot) for slot in run.slots]
        return _answers_match(singles, answers)

    def prompt_cache(self) -> str:
        with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
            path = Path(tmp) / "system.cache"
            with self.manager.lease(self.model) as lease:
                rt = lease.runtime
                rt.set_function_tools("You are a careful assistant. " * 20, "[]")
                rt.generate("Hi.", save_prompt_cache=path)
                if not path.is_file() or path.stat().st_size == 0:
                    raise AssertionError("the runtime wrote no prompt cache file")
                rt.load_prompt_cache(path)
                rt.generate("Hello again.")
                rt.release_prompt_cache()
            return f"saved {path.stat().st_size} bytes, loaded and released"


def _test_picture() -> bytes:
    """A small PNG (a red field with a white square), made with Pillow (ImportError without it)."""
    import io

    from PIL import Image

    image = Image.new("RGB", (96, 64), (200, 30, 30))
    image.paste((255, 255, 255), (60, 8, 88, 36))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _image_turn(manager: ModelManager, model: str, picture: bytes) -> str:
    """One chat turn with an image (no prompt cache); the answer text, or AssertionError when empty."""
    from ..chat.engine import ChatEngine
    from ..chat.messages import ChatMessage, ImagePart

    message = ChatMessage("user", "Describe this image in one sentence.", images=(ImagePart(data=picture),))
    done = ChatEngine(manager, prompt_cache=False).chat(model, [message])
    if not done.text.strip():
        raise AssertionError("the model produced no text for the image")
    if done.usage.prefilled_tokens <= 0:
        raise AssertionError("nothing was prefilled for the image turn")
    return done.text.strip()


def _answers_match(singles: Sequence[str], batched: Sequence[str]) -> str:
    """The step's detail when every batched answer equals its single-run answer; else AssertionError."""
    wrong = [i for i, (a, b) in enumerate(zip(singles, batched, strict=True)) if a != b]
    if wrong:
        shown = "; ".join(f"prompt {i + 1}: single {singles[i][:40]!r}, batched {batched[i][:40]!r}" for i in wrong)
        raise AssertionError(f"{len(wrong)} of {len(singles)} batched answers differ from their single runs: {shown}")
    return f"{len(singles)} prompts in one run; every answer equals its single run"


def format_report(results: Sequence[CheckResult], header: str = "") -> str:
    """A plain-text pass/fail report to paste into an issue."""
    lines = [header] if header else []
    for r in results:
        lines.append(f"[{r.status}] {r.name} ({r.seconds:.2f} s): {r.detail}")
    failed = sum(r.status == "FAIL" for r in results)
    warned = sum(r.status == "WARN" for r in results)
    tail = f" ({warned} with a warning)" if warned else ""
    lines.append(
        f"result: {failed} of {len(results)} checks FAILED{tail}"
        if failed
        else f"result: all {len(results)} checks OK{tail}"
    )
    return "\n".join(lines)


def default_manager_for(model_dirs: Sequence[str] | None, library: str | None) -> ModelManager:
    """A manager with a budget of one model, so the swap step really swaps."""
    return ModelManager(ModelRegistry(list(model_dirs) if model_dirs else None), library=library, max_loaded=1)
