"""``rkllm bench``: load time, TTFT, prefill and decode speed, memory — with the system state.

Each measurement is taken twice where it can be: from the runtime's own perf
stats and from the wall clock around the stream. Reports record what decides
the speed on a board (CPU governors, NPU and DDR devfreq clocks, driver and
runtime versions) and compare decode speed with Rockchip's published table
when the model, dtype and platform are in it.

The JSON schema (``schema: 1``)::

    {"schema": 1, "title", "simulated": bool, "partial": bool, "created",
     "library": {...}, "system": {...},                  # see rkllm_core.board
     "config": {"prompt_tokens": [...], "new_tokens", "repeat", "warmup"},
     "reference": {"source", "runtime"},
     "results": [{"model", "filename", "dtype", "platform", "context", "load_s",
                  "prompt_tokens", "runs",
                  "median": {metric: value}, "min": {...}, "max": {...},
                  "official": {"tokens_per_s", "ttft_ms", "memory_mb"} | null,
                  "vs_official": float | null, "partial"?: true}],
     "retrieval": [...],                                 # embedding and reranker models
     "vision": [{"model", "kind", "filename", "dtype", "platform", "encoder",
                 "input", "image_tokens", "runs", "median": {metric: value}}]}

A row with ``"partial": true`` holds the runs completed at that point before
the benchmark was interrupted (fewer than ``repeat``).

Metrics: ``ttft_ms`` (wall), ``prefill_tps`` / ``decode_tps`` (runtime perf
stats), ``prefill_tps_wall`` / ``decode_tps_wall`` (wall clock),
``prefill_tokens``, ``generate_tokens``, ``memory_mb`` (runtime, VmHWM) and
``rss_mb`` (process peak RSS).

Vision models with an image encoder get one ``vision`` row each: ``preprocess_ms``
(decoding, padding and resizing one image on the host), ``encode_ms`` (one image on
the encoder, per image), ``image_ttft_ms`` (time to the first token of a chat turn
with one image: preprocessing, encoding and the prefill of its image tokens) and
``image_prefill_tokens``. Each run uses a new image, so nothing comes from the image
cache (without Pillow, the ``vision`` extra, there are no vision rows). Older reports have no
``vision`` key; every reader treats it as empty.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from ..board import read_system_state
from ..embed import EmbeddingEngine
from ..errors import ModelKindError, NoModelsFoundError
from ..filenames import friendly_name, parse_model_filename
from ..models.manager import ModelManager
from ..models.registry import CHAT_KINDS, ModelInfo
from ..params import InitParams
from .loading import show_loads

SCHEMA = 1
METRICS = (
    "ttft_ms",
    "prefill_tps",
    "prefill_tps_wall",
    "decode_tps",
    "decode_tps_wall",
    "prefill_tokens",
    "generate_tokens",
    "memory_mb",
    "rss_mb",
)
VISION_METRICS = ("preprocess_ms", "encode_ms", "image_ttft_ms", "image_prefill_tokens")
_FILLER = (
    "the sky is blue and the sea is wide while birds fly over old towns near green hills "
    "where people walk slowly along quiet roads at the end of a long summer day "
).split()


@dataclass(frozen=True)
class BenchConfig:
    """What to run: prompt lengths (tokens), new tokens per run, repetitions, warm-up runs."""

    prompt_tokens: tuple[int, ...] = (128, 1024)
    new_tokens: int = 64
    repeat: int = 3
    warmup: int = 1


def make_prompt(tokens: int) -> str:
    """A prompt of roughly ``tokens`` tokens that asks for a long answer (one short word ≈ one token)."""
    ask = "Now count to 100000, numbers separated by spaces."
    words = max(0, tokens - 12)
    return " ".join(_FILLER[i % len(_FILLER)] for i in range(words)) + "\n" + ask


def official_table() -> dict[str, Any]:
    """Rockchip's published benchmark table (data shipped with the package)."""
    raw = resources.files("rkllm_core").joinpath("data/rockchip_benchmark.json").read_text()
    table: dict[str, Any] = json.loads(raw)
    return table


def find_official(info: ModelInfo, table: dict[str, Any]) -> dict[str, Any] | None:
    """The published row for this model's family, size, dtype and platform, if any."""
    facts = info.facts
    if not (facts.dtype and facts.platform):
        return None
    base = friendly_name(facts)
    for row in table["rows"]:
        row_name = friendly_name(parse_model_filename(f"{row['model']}-{row['size']}-{row['dtype']}.rkllm"))
        if row_name == base and row["dtype"] == facts.dtype and row["platform"] == facts.platform:
            return dict(row)
    return None


#: Texts (or query/document pairs) per embedding or reranking call in a benchmark run.
RETRIEVAL_BATCH = 16
RETRIEVAL_METRICS = ("items_per_s", "tokens_per_s", "ms_per_item")


def _retrieval_run(engine: EmbeddingEngine, info: ModelInfo, tokens: int) -> dict[str, float]:
    texts = [
        " ".join(_FILLER[(i + j) % len(_FILLER)] for j in range(max(1, tokens - 4))) for i in range(RETRIEVAL_BATCH)
    ]
    t0 = time.perf_counter()
    if info.kind == "embedding":
        used = engine.embed(info.name, texts).input_tokens
    else:
        used = engine.rerank(info.name, "where do birds fly over the hills?", texts).input_tokens
    wall = time.perf_counter() - t0
    return {
        "items_per_s": RETRIEVAL_BATCH / wall if wall > 0 else 0.0,
        "tokens_per_s": used / wall if wall > 0 else 0.0,
        "ms_per_item": wall * 1000 / RETRIEVAL_BATCH,
    }


def _bench_picture(seed: int) -> bytes:
    """A 640x480 PNG whose colours depend on ``seed`` (a new image per run), made with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (200, (seed * 37) % 256, 30))
    ImageDraw.Draw(image).ellipse((400, 40, 560, 200), fill=(255, 255, (seed * 91) % 256))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _vision_run(manager: ModelManager, name: str, new_tokens: int, seeds: Iterator[int]) -> dict[str, float]:
    """Time one image through the encoder alone, then a chat turn with another image (to its first token)."""
    from ..chat.engine import ChatDone, ChatEngine, TextDelta
    from ..chat.messages import ChatMessage, ImagePart
    from ..chat.options import ChatOptions
    from ..vision.preprocess import preprocess

    with manager.lease(name) as lease:
        encoder = lease.encoder
        if encoder is None:
            raise ModelKindError(f"{name} was loaded without its image encoder")
        t0 = time.perf_counter()
        pixels = preprocess(_bench_picture(next(seeds)), encoder.pixel_spec)
        t1 = time.perf_counter()
        encoder.encode(pixels)
        t2 = time.perf_counter()
    message = ChatMessage("user", "What is in this picture?", images=(ImagePart(data=_bench_picture(next(seeds))),))
    engine = ChatEngine(manager, prompt_cache=False, reuse_kv=False)
    t_start, t_first, done = time.perf_counter(), None, None
    for event in engine.stream(name, [message], ChatOptions(max_new_tokens=new_tokens)):
        if t_first is None and isinstance(event, TextDelta):
            t_first = time.perf_counter()
        done = event
    t_first = t_first or time.perf_counter()
    prefilled = done.usage.prefilled_tokens if isinstance(done, ChatDone) else 0
    return {
        "preprocess_ms": (t1 - t0) * 1000,
        "encode_ms": (t2 - t1) * 1000,
        "image_ttft_ms": (t_first - t_start) * 1000,
        "image_prefill_tokens": float(prefilled),
    }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _one_run(manager: ModelManager, name: str, prompt: str, new_tokens: int) -> dict[str, float]:
    per_run = manager.library.backend.per_run_sampling
    init = None if per_run else InitParams(max_new_tokens=new_tokens)
    with manager.lease(name, init) as lease:
        rt = lease.runtime
        kwargs: dict[str, Any] = {"max_new_tokens": new_tokens} if per_run else {}
        t0 = time.perf_counter()
        t_first: float | None = None
        stream = rt.stream(prompt, **kwargs)
        for chunk in stream:
            if t_first is None and chunk.text:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        stats = stream.stats
    t_first = t_first or t_end
    gen = stats.generate_tokens if stats else 0
    prefill = stats.prefill_tokens if stats else 0
    ttft = (t_first - t0) * 1000
    return {
        "ttft_ms": ttft,
        "prefill_tps": stats.prefill_tokens_per_s if stats else 0.0,
        "prefill_tps_wall": prefill * 1000 / ttft if ttft > 0 else 0.0,
        "decode_tps": stats.decode_tokens_per_s if stats else 0.0,
        "decode_tps_wall": (gen - 1) / (t_end - t_first) if gen > 1 and t_end > t_first else 0.0,
        "prefill_tokens": float(prefill),
        "generate_tokens": float(gen),
        "memory_mb": stats.memory_usage_mb if stats else 0.0,
        "rss_mb": _rss_mb(),
    }


def run_bench(
    manager: ModelManager,
    models: Sequence[str],
    config: BenchConfig,
    *,
    progress: TextIO | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``models`` (all registered ones when empty) and return the report.

    Chat and vision models are timed generating (``results``); embedding and
    reranker models embedding :data:`RETRIEVAL_BATCH` texts, or scoring as many
    (query, document) pairs, per call (``retrieval``: items/s and prefill tokens/s).

    ``KeyboardInterrupt`` stops early: the report so far is returned with ``partial: true``,
    including the runs completed at the point in progress (that row marked ``partial: true``).
    """
    chat_infos, retrieval_infos = _models_to_bench(manager, models)
    vision_infos = _vision_models(chat_infos)
    table = official_table()
    report = _new_report(manager, config, table)
    points = (len(chat_infos) + len(retrieval_infos)) * len(config.prompt_tokens) + len(vision_infos)
    bar = _Progress(progress, points * (config.repeat + config.warmup))

    def point(rows: list[dict[str, Any]], label: str, run: Callable[[], dict[str, float]], row: _Row) -> None:
        runs: list[dict[str, float]] = []
        try:
            bar.repeat(config, label, run, runs)
        except KeyboardInterrupt:
            if runs:  # keep what was measured, marked as such
                rows.append({**row(runs), "partial": True})
            raise
        rows.append(row(runs))
        if on_result is not None:
            on_result(report)

    loads = show_loads(manager, progress, bar.break_line) if progress is not None else contextlib.nullcontext()
    with loads:
        try:
            for info in chat_infos:
                load_s = _load_alone(manager, info, config.new_tokens)
                official = find_official(info, table)
                for tokens in config.prompt_tokens:
                    run = partial(_one_run, manager, info.name, make_prompt(tokens), config.new_tokens)
                    row = partial(_chat_result, info, tokens, load_s, official=official)
                    point(report["results"], f"{info.name} prompt {tokens}", run, row)
            engine = EmbeddingEngine(manager)
            for info in retrieval_infos:
                for tokens in config.prompt_tokens:
                    run = partial(_retrieval_run, engine, info, tokens)
                    label = f"{info.name} {tokens}-token texts"
                    point(report["retrieval"], label, run, partial(_retrieval_result, info, tokens))
            for info in vision_infos:
                run = partial(_vision_run, manager, info.name, config.new_tokens, itertools.count())
                point(report["vision"], f"{info.name} image", run, partial(_vision_result, manager, info))
        except KeyboardInterrupt:
            report["partial"] = True
    bar.end()
    return report


# Makes one report row from the measured runs of a point.
_Row = Callable[[list[dict[str, float]]], dict[str, Any]]


def _models_to_bench(manager: ModelManager, models: Sequence[str]) -> tuple[list[ModelInfo], list[ModelInfo]]:
    """The chat (and vision) models and the embedding and reranker models among ``models`` (default: all)."""
    infos = [manager.resolve(m) for m in models] if models else manager.registry.models()
    if not infos:
        dirs = [str(d) for d in manager.registry.model_dirs]
        raise NoModelsFoundError(
            f"no .rkllm models found; searched: {', '.join(dirs)}; put model files there or set RKLLM_MODEL_DIR",
            searched=dirs,
        )
    retrieval = [info for info in infos if info.kind in ("embedding", "reranker")]
    return [info for info in infos if info.kind in CHAT_KINDS], retrieval


def _vision_models(chat_infos: Sequence[ModelInfo]) -> list[ModelInfo]:
    """The vision models with an image encoder, when Pillow (the ``vision`` extra) can make the test images."""
    if importlib.util.find_spec("PIL") is None:
        return []
    return [info for info in chat_infos if info.kind == "vision" and info.encoder is not None]


def _new_report(manager: ModelManager, config: BenchConfig, table: dict[str, Any]) -> dict[str, Any]:
    """A report with its header filled in (library, system, config, reference) and no results yet."""
    lib = manager.library
    system = read_system_state().as_dict()
    where = system.get("board") or system.get("soc") or system.get("machine")
    return {
        "schema": SCHEMA,
        "simulated": lib.is_simulator,
        "partial": False,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "library": {"path": str(lib.path), "abi": lib.abi, "abi_reason": lib.abi_reason, "version": lib.version},
        "system": system,
        "config": {
            "prompt_tokens": list(config.prompt_tokens),
            "new_tokens": config.new_tokens,
            "repeat": config.repeat,
            "warmup": config.warmup,
        },
        "reference": {"source": table["source"], "runtime": table["runtime"]},
        "results": [],
        "retrieval": [],
        "vision": [],
        "title": f"RKLLM benchmark — {where}" + (" (simulated)" if lib.is_simulator else ""),
    }


class _Progress:
    """A one-line progress bar on ``out`` (nothing when ``out`` is None), counting runs."""

    def __init__(self, out: TextIO | None, total: int) -> None:
        self._out = out
        self._total = total
        self._done = 0
        self._drawn = False

    def repeat(
        self, config: BenchConfig, label: str, run: Callable[[], dict[str, float]], runs: list[dict[str, float]]
    ) -> None:
        """Run ``run`` ``config.warmup + config.repeat`` times; add the measurements after the warm-up to ``runs``.

        Each measurement is added as soon as it is taken, so an interruption keeps the ones before it.
        """
        for i in range(config.warmup + config.repeat):
            self._show(f"{label} run {i + 1}")
            measured = run()
            self._done += 1
            if i >= config.warmup:
                runs.append(measured)

    def break_line(self) -> None:
        """End the bar's line if it was drawn since the last break, so other output starts a line."""
        if self._out is not None and self._drawn:
            self._out.write("\n")
            self._out.flush()
        self._drawn = False

    def _show(self, label: str) -> None:
        self._drawn = True
        if self._out is not None:
            width = 30
            filled = int(width * self._done / max(self._total, 1))
            self._out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._done}/{self._total} {label:<40}")
            self._out.flush()

    def end(self) -> None:
        """End the bar's line."""
        if self._out is not None:
            self._out.write("\n")


def _load_alone(manager: ModelManager, info: ModelInfo, new_tokens: int) -> float:
    """Unload the other idle models, then load ``info``; the seconds the load took."""
    for name, entry in ((e.info.name, e) for e in manager.loaded()):
        if name != info.name and entry.leases == 0:
            manager.unload(name)
    t0 = time.perf_counter()
    with manager.lease(info.name, InitParams(max_new_tokens=new_tokens)):
        pass
    return time.perf_counter() - t0


def _chat_result(
    info: ModelInfo, tokens: int, load_s: float, runs: list[dict[str, float]], official: dict[str, Any] | None
) -> dict[str, Any]:
    """One ``results`` row: a chat model at one prompt length, compared with the published table."""
    median = {k: statistics.median(r[k] for r in runs) for k in METRICS}
    result: dict[str, Any] = {
        **_model_fields(info),
        "context": info.context_size,
        "load_s": load_s,
        "prompt_tokens": tokens,
        "runs": runs,
        "median": median,
        "min": {k: min(r[k] for r in runs) for k in METRICS},
        "max": {k: max(r[k] for r in runs) for k in METRICS},
        "official": None,
        "vs_official": None,
    }
    if official is not None and tokens == official["prompt_tokens"]:
        result["official"] = {k: official[k] for k in ("tokens_per_s", "ttft_ms", "memory_mb")}
        result["vs_official"] = median["decode_tps"] / official["tokens_per_s"]
    return result


def _retrieval_result(info: ModelInfo, tokens: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    """One ``retrieval`` row: an embedding or reranker model at one text length."""
    return {
        **_model_fields(info),
        "text_tokens": tokens,
        "batch": RETRIEVAL_BATCH,
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in RETRIEVAL_METRICS},
    }


def _vision_result(manager: ModelManager, info: ModelInfo, runs: list[dict[str, float]]) -> dict[str, Any]:
    """One ``vision`` row: a vision model's encoder and a turn with an image (the encoder's geometry, as loaded)."""
    row: dict[str, Any] = {**_model_fields(info), "encoder": info.encoder.name if info.encoder else None}
    loaded = next((e.encoder for e in manager.loaded() if e.info.name == info.name and e.encoder), None)
    if loaded is not None:
        g = loaded.geometry
        row.update(input=f"{g.height}x{g.width}", image_tokens=g.n_tokens)
    return {**row, "runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in VISION_METRICS}}


def _model_fields(info: ModelInfo) -> dict[str, Any]:
    return {
        "model": info.name,
        "kind": info.kind,
        "filename": info.filename,
        "dtype": info.dtype,
        "platform": info.platform,
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a system summary and one table row per model and prompt length."""
    s = report["system"]
    lib = report["library"]
    lines = [f"# {report['title']}" + (" — PARTIAL (interrupted)" if report.get("partial") else ""), ""]
    governors = ", ".join(sorted(set(s.get("cpu_governors", {}).values()))) or "unknown"
    clocks = "; ".join(
        f"{d['kind']} {n}: {d.get('governor')} {d.get('cur_freq')} MHz"
        for n, d in s.get("devfreq", {}).items()
        if d.get("kind") in ("npu", "dmc")
    )
    lines += [
        f"- runtime: {lib['path']} (ABI {lib['abi']}, version {lib.get('version') or 'unknown'})",
        f"- board: {s.get('board') or 'unknown'}, SoC {s.get('soc') or 'unknown'}, RAM {s.get('ram_mb')} MB, "
        f"{s.get('kernel')}, NPU driver {s.get('npu_driver') or 'unknown'}",
        f"- CPU governors: {governors}" + (f"; {clocks}" if clocks else ""),
        f"- not readable: {', '.join(s.get('unreadable', {})) or 'nothing'}",
        f"- {report['config']['new_tokens']} new tokens, median of {report['config']['repeat']} runs after "
        f"{report['config']['warmup']} warm-up; speeds from the runtime's perf stats (wall clock in brackets)",
        "",
        "| Model | Prompt | Speed (tok/s) | vs official | TTFT (ms) | Prefill (tok/s) | Context | Memory (MB) "
        "| RSS (MB) | Load (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m, lo, hi = r["median"], r["min"], r["max"]
        vs = f"{r['vs_official']:.0%} of {r['official']['tokens_per_s']}" if r.get("vs_official") else "—"
        lines.append(
            f"| {r['model']} | {r['prompt_tokens']}{_partial_note(r)} | "
            f"{m['decode_tps']:.1f} ({m['decode_tps_wall']:.1f}) "
            f"[{lo['decode_tps']:.1f}–{hi['decode_tps']:.1f}] | {vs} | {m['ttft_ms']:.0f} | "
            f"{m['prefill_tps']:.0f} ({m['prefill_tps_wall']:.0f}) | {r['context']} | {m['memory_mb']:.0f} | "
            f"{m['rss_mb']:.0f} | {r['load_s']:.2f} |"
        )
    if report.get("retrieval"):
        lines += [
            "",
            f"| Model | Kind | Text (tokens) | Items/s (batch of {RETRIEVAL_BATCH}) | Prefill (tok/s) | ms/item |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["retrieval"]:
            m = r["median"]
            unit = "texts" if r["kind"] == "embedding" else "pairs"
            lines.append(
                f"| {r['model']} | {r['kind']} | {r['text_tokens']}{_partial_note(r)} | "
                f"{m['items_per_s']:.1f} {unit} | "
                f"{m['tokens_per_s']:.0f} | {m['ms_per_item']:.1f} |"
            )
    lines += _vision_markdown(report.get("vision") or [])
    lines += ["", f"Official numbers: {report['reference']['source']} (runtime {report['reference']['runtime']})."]
    return "\n".join(lines) + "\n"


def _vision_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The vision table: per model, the encoder's input and tokens, ms per image, TTFT of a turn with an image."""
    if not rows:
        return []
    lines = [
        "",
        "| Model | Encoder | Input | Image tokens | Preprocess (ms) | Encoder (ms/image) | TTFT with an image (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["median"]
        lines.append(
            f"| {r['model']}{_partial_note(r)} | {r.get('encoder') or '—'} | {r.get('input', '—')} | "
            f"{r.get('image_tokens', '—')} | {m['preprocess_ms']:.1f} | {m['encode_ms']:.1f} | "
            f"{m['image_ttft_ms']:.0f} |"
        )
    return lines


def _partial_note(row: dict[str, Any]) -> str:
    """`` (partial: N runs)`` for a row cut short by an interruption, else nothing."""
    return f" (partial: {len(row['runs'])} runs)" if row.get("partial") else ""


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """A markdown table of the differences between two reports (matched by model and prompt length)."""
    index = {(r["model"], r["prompt_tokens"]): r for r in a["results"]}
    lines = [
        f"# {a['title']} → {b['title']}",
        "",
        "| Model | Prompt | Speed (tok/s) | TTFT (ms) | Memory (MB) |",
        "|---|---|---|---|---|",
    ]

    def delta(old: float, new: float) -> str:
        pct = f" ({(new - old) / old:+.0%})" if old else ""
        return f"{old:.1f} → {new:.1f}{pct}"

    for r in b["results"]:
        old = index.get((r["model"], r["prompt_tokens"]))
        if old is None:
            lines.append(f"| {r['model']} | {r['prompt_tokens']} | only in the second report | | |")
            continue
        m0, m1 = old["median"], r["median"]
        lines.append(
            f"| {r['model']} | {r['prompt_tokens']} | {delta(m0['decode_tps'], m1['decode_tps'])} | "
            f"{delta(m0['ttft_ms'], m1['ttft_ms'])} | {delta(m0['memory_mb'], m1['memory_mb'])} |"
        )
    lines += _vision_compare(a.get("vision") or [], b.get("vision") or [], delta)
    diffs = []
    for key in ("cpu_governors", "devfreq", "npu_driver", "kernel"):
        if a["system"].get(key) != b["system"].get(key):
            diffs.append(key)
    if a["library"].get("version") != b["library"].get("version"):
        diffs.append("runtime version")
    lines += ["", "System differences: " + (", ".join(diffs) if diffs else "none recorded")]
    return "\n".join(lines) + "\n"


def _vision_compare(
    old_rows: list[dict[str, Any]], new_rows: list[dict[str, Any]], delta: Callable[[float, float], str]
) -> list[str]:
    """The vision part of :func:`compare` (nothing when the second report has no vision rows)."""
    if not new_rows:
        return []
    index = {r["model"]: r for r in old_rows}
    lines = ["", "| Model | Encoder (ms/image) | TTFT with an image (ms) |", "|---|---|---|"]
    for r in new_rows:
        old = index.get(r["model"])
        if old is None:
            lines.append(f"| {r['model']} | only in the second report | |")
            continue
        m0, m1 = old["median"], r["median"]
        lines.append(
            f"| {r['model']} | {delta(m0['encode_ms'], m1['encode_ms'])} | "
            f"{delta(m0['image_ttft_ms'], m1['image_ttft_ms'])} |"
        )
    return lines


def write_outputs(report: dict[str, Any], json_path: Path, markdown_path: Path | None) -> None:
    """Write the JSON (atomically) and the markdown report."""
    tmp = json_path.with_suffix(json_path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(json_path)
    if markdown_path is not None:
        markdown_path.write_text(to_markdown(report))


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report written by ``rkllm bench``.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not an ``rkllm bench`` report; the message names it.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not an rkllm bench report (not JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not an rkllm bench report (schema {schema!r})")
    missing = [k for k in ("title", "system", "library", "results") if k not in data]
    if missing or not isinstance(data["results"], list):
        raise ValueError(f"{path} is not a complete rkllm bench report (missing {', '.join(missing) or 'results'})")
    return data
