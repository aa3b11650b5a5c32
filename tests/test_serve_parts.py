"""rkllm serve's shared parts on their own: the admission line, the dependencies, the error classification.

No model and no runtime: the dependencies are exercised through a small router of a made-up
protocol, which is also what a second protocol's router looks like.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi import APIRouter, Depends, FastAPI  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from rkllm_core.chat.parse.events import TextDelta  # noqa: E402
from rkllm_core.errors import (  # noqa: E402
    BusyError,
    ContextLengthError,
    InvalidParameterError,
    ModelKindError,
    ModelNotFoundError,
)
from rkllm_core.serve.admission import AdmissionLine  # noqa: E402
from rkllm_core.serve.deps import (  # noqa: E402
    AuthError,
    BodyTooLargeError,
    JsonBody,
    ServerSettings,
    metered,
    problem_of,
    protocol_route,
    require_api_key,
    server_state,
)
from rkllm_core.serve.wire import WireError  # noqa: E402

# -- the admission line --------------------------------------------------------------------------------------


def test_each_model_has_its_own_bounded_line() -> None:
    line = AdmissionLine(2)
    a1, a2 = line.enter("a"), line.enter("a")
    with pytest.raises(BusyError) as busy:
        line.enter("a")
    assert busy.value.reason == "busy" and "2 requests for a" in str(busy.value)
    b = line.enter("b")  # another model's line is its own
    assert (line.in_flight("a"), line.in_flight("b")) == (2, 1)
    a1.release()
    a3 = line.enter("a")  # the place given back is taken again
    assert line.in_flight("a") == 2
    for place in (a2, a3, b):
        place.release()
    assert (line.in_flight("a"), line.in_flight("b")) == (0, 0)


def test_a_place_is_given_back_once_however_often_released() -> None:
    line = AdmissionLine(1)
    with line.enter("a") as place:
        assert line.in_flight("a") == 1
    assert place.released and line.in_flight("a") == 0
    place.release()
    place.release()  # a stream's end and its response's background task both release
    assert line.in_flight("a") == 0
    other = line.enter("a")
    place.release()  # a stale place must not free the one taken since
    assert line.in_flight("a") == 1 and not other.released


def test_places_given_back_from_many_threads_are_counted_exactly() -> None:
    line = AdmissionLine(10_000)
    places = [line.enter("a") for _ in range(4000)]
    start = threading.Barrier(8)

    def give_back(part: int) -> None:
        start.wait()
        for place in places[part::4]:  # every place is released by two threads at once
            place.release()

    threads = [threading.Thread(target=give_back, args=(i % 4,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert line.in_flight("a") == 0


# -- the error classification --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "param", "code"),
    [
        (AuthError("no key"), 401, None, "invalid_api_key"),
        (BodyTooLargeError("big"), 413, None, None),
        (WireError("bad role", "messages[0].role"), 400, "messages[0].role", None),
        (ModelNotFoundError("no model"), 404, "model", "model_not_found"),
        (ModelKindError("an embedding model"), 400, "model", "wrong_model_kind"),
        (ContextLengthError("too long"), 400, "messages", "context_length_exceeded"),
        (InvalidParameterError("top_p"), 400, None, None),
        (BusyError("in use", reason="deadlock"), 429, None, "busy_deadlock"),
        (KeyError("a bug"), 500, None, None),
    ],
)
def test_every_failure_has_a_status(exc: Exception, status: int, param: str | None, code: str | None) -> None:
    problem = problem_of(exc)
    assert (problem.status, problem.param, problem.code) == (status, param, code)
    assert problem.kind == {429: "rate_limit_error", 500: "server_error"}.get(status, "invalid_request_error")
    assert ("Retry-After" in problem.headers) == (status == 429)


def test_http_exceptions_keep_their_status_and_headers() -> None:
    problem = problem_of(HTTPException(405, "method not allowed: GET /x", {"Allow": "POST"}))
    assert (problem.status, problem.message) == (405, "method not allowed: GET /x")
    assert dict(problem.headers) == {"Allow": "POST"}


# -- the dependencies, through a made-up protocol's router ----------------------------------------------------


def plain_error(exc: Exception) -> Response:
    """The made-up protocol's error shape: ``{"oops": message}``."""
    problem = problem_of(exc)
    return JSONResponse({"oops": problem.message}, status_code=problem.status)


def tiny_app(**settings: Any) -> FastAPI:
    router = APIRouter(route_class=protocol_route(plain_error), dependencies=[Depends(require_api_key)])

    @router.post("/echo")
    async def echo(body: JsonBody) -> Response:
        if body == "fail":
            raise ModelNotFoundError("no model 'fail'")
        return JSONResponse({"got": body})

    app = FastAPI()
    app.include_router(router)
    app.dependency_overrides[server_state] = lambda: SimpleNamespace(settings=ServerSettings(**settings))
    return app


def post(app: FastAPI, content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/echo", content=content, headers=headers)

    return asyncio.run(main())


def counted(chunks: list[bytes]) -> tuple[Callable[[], AsyncIterator[bytes]], list[int]]:
    """A chunked body (no Content-Length) and the list of chunks read from it so far."""
    read: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            read.append(len(chunk))
            yield chunk

    return body, read


def test_the_body_dependency_reads_json() -> None:
    assert post(tiny_app(), b'{"a": [1, 2]}').json() == {"got": {"a": [1, 2]}}
    bad = post(tiny_app(), b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["oops"]
    failed = post(tiny_app(), b'"fail"')  # the endpoint's failure, in the router's own shape
    assert failed.status_code == 404 and failed.json() == {"oops": "no model 'fail'"}


def test_the_body_limit_holds_with_and_without_content_length() -> None:
    app = tiny_app(max_body_bytes=100)
    declared = post(app, b"[" + b"1," * 60 + b"1]")
    assert declared.status_code == 413 and "larger than 100 bytes" in declared.json()["oops"]
    body, read = counted([b"[" + b"1," * 30, b"1," * 30, b"1," * 1000, b"1]"])
    streamed = post(app, body())
    assert streamed.status_code == 413
    assert len(read) < 4  # refused as soon as it grew past the limit, not after reading it all
    body, read = counted([b"[1,", b"2]"])
    assert post(app, body()).json() == {"got": [1, 2]}


def test_the_api_key_is_checked_before_the_body_is_read() -> None:
    app = tiny_app(api_key="s3cret", max_body_bytes=100)
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        body, read = counted([b"x" * 1000])
        denied = post(app, body(), headers)
        assert denied.status_code == 401 and "API key" in denied.json()["oops"]
        assert read == []
    assert post(app, b"[1]", {"authorization": "Bearer s3cret"}).json() == {"got": [1]}


def test_metered_gives_the_place_back_and_closes_the_stream_when_abandoned() -> None:
    line = AdmissionLine(1)
    closed: list[bool] = []

    async def engine_stream() -> AsyncIterator[object]:
        try:
            for word in ("one", "two", "three"):
                yield TextDelta(word)
        finally:
            closed.append(True)

    async def main() -> object:
        place = line.enter("a")
        events = metered(engine_stream(), SimpleNamespace(), place.release)  # type: ignore[arg-type]
        first = await events.__anext__()
        assert line.in_flight("a") == 1
        await events.aclose()  # the client went away after the first word
        return first

    assert asyncio.run(main()) == TextDelta("one")
    assert closed == [True] and line.in_flight("a") == 0
