"""Two models, many requests at once: what a FastAPI app or an agent swarm does to a board.

Usage:
    python examples/langchain_concurrency.py

* ``asyncio.gather`` over two ``abatch`` calls on two different models: with the default budget
  (one model loaded at a time) the requests queue in arrival order and the manager swaps the
  models as needed; nothing waits by parking a thread, and every answer belongs to its prompt.
* A task cancelled in the middle of a stream stops the generation on the NPU at once; the model
  keeps serving.
* A request made from inside a stream of the same model (say, a callback that calls the model
  again) would wait for itself: it fails at once with ``BusyError`` instead.
"""

from __future__ import annotations

import asyncio
import time

from _setup import another_model, setup

from langchain_rkllm import ChatRKLLM
from rkllm_core.errors import BusyError


async def main() -> int:
    env = setup()
    first, second = ChatRKLLM(model=env.model, max_tokens=64), ChatRKLLM(model=another_model(env), max_tokens=64)
    print(f"models: {first.model} and {second.model}")

    questions = [f"Question {i}: what is {i} squared?" for i in range(4)]
    t0 = time.perf_counter()
    a, b = await asyncio.gather(first.abatch(questions), second.abatch(questions))
    print(f"{len(a) + len(b)} answers from two models in {time.perf_counter() - t0:.1f} s:")
    for model, answers in ((first.model, a), (second.model, b)):
        for q, reply in zip(questions, answers, strict=True):
            print(f"  [{model}] {q} -> {reply.content}")

    started = asyncio.Event()

    async def read_stream() -> None:
        async for chunk in first.astream("count to 500", max_tokens=1000):
            print(chunk.text, end="", flush=True)
            started.set()
            await asyncio.sleep(0.05)  # a slow consumer (a web client, a UI)

    task = asyncio.create_task(read_stream())
    await started.wait()
    task.cancel()  # aborts the generation on the NPU
    try:
        await task
    except asyncio.CancelledError:
        print("\n(cancelled mid-stream)")
    print(f"still serving: {(await first.ainvoke('Still there?')).content}")

    async for _chunk in first.astream("count to 20"):
        try:
            await first.ainvoke("a nested request for the same model")
        except BusyError as exc:
            print(f"nested request refused at once ({exc.reason}): {str(exc)[:72]}...")
        break
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
