"""The coordinator's OpenAI-compatible HTTP front: FastAPI on uvicorn, in the coordinator's
own process and event loop, next to its gRPC server.

Every generation goes through `Coordinator.stream`, the call the gRPC servicer makes:
admission, routing, the speculation loop and session records are the same code. This
module only converts OpenAI's JSON to `RequestSpec`s and the chunks back, and maps the
core's errors to OpenAI's error JSON (400 naming the param, 404 unknown model, 429
overloaded with Retry-After, 503 tier unavailable).

A streamed request's headers go out once its first chunk is verified, so that a request
refused (bad field, full queue, no target tier) gets its status code rather than a
stream that opens and fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from specdec.core.errors import InvalidArgument, Overloaded, TierUnavailable
from specdec.core.generation import Chunk, GenerationResult, chunk_logprobs
from specdec.core.request import RequestSpec
from specdec.core.tokenizer import Decoder
from specdec.core.types import TokenLogprob
from specdec.http.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    envelope,
    error_body,
    finish_reason,
    new_id,
    param_for,
    prompt_tokens,
    usage,
)
from specdec.rpc.auth import AccessPolicy
from specdec.rpc.server import access_policy, tls_files

if TYPE_CHECKING:
    from pydantic import BaseModel

    from specdec.config import Settings
    from specdec.coordinator.service import Coordinator

log = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0  # JSON has no -inf (a token the model rules out entirely)
SSE_PING_S = 15  # keep-alive comment on a quiet stream (proxies close idle connections)
TLS_POLL_S = 1.0  # how often the HTTP front looks for rotated certificate files (one stat() each)
T = TypeVar("T")


class UnknownModel(LookupError):
    pass


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.kind, self.param, self.code), self.status, self.headers)

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.kind, self.param, self.code)


def api_error(exc: BaseException, request: BaseModel | None = None) -> ApiError:
    """The core's exceptions as OpenAI's errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidArgument):
        param = param_for(exc.field, request)
        message = str(exc).removeprefix(f"{exc.field}: ")
        return ApiError(400, f"{param}: {message}", "invalid_request_error", param, "invalid_value")
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, Overloaded):
        return ApiError(
            429,
            str(exc),
            "rate_limit_error",
            None,
            "overloaded",
            {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        )
    if isinstance(exc, TierUnavailable):
        return ApiError(503, str(exc), "service_unavailable_error", None, "tier_unavailable")
    name = type(exc).__name__
    if name in ("CannotResume", "RunningElsewhere"):  # the coordinator's resumption outcomes
        return ApiError(409, str(exc)[:500], "conflict_error", None, name)
    log.error("HTTP front: internal error", exc_info=exc)
    return ApiError(500, f"internal error: {name}", "server_error", None, "internal_error")


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(
            400,
            f"the body is not valid JSON: {str(first.get('msg', ''))[:200]}",
            "invalid_request_error",
            None,
            "invalid_json",
        )
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # pydantic names the union member a value failed against ("str", "list[int]"): not a param
    loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = str(first.get("msg", "invalid request"))[:300]
    return ApiError(400, f"{param}: {message}" if param else message, "invalid_request_error", param, "invalid_value")


class Choices:
    """The coordinator streams of one request's choices, merged: (choice index, chunk),
    and (index, None) when that choice is done; `results` fill in as they finish.

    Each choice is a request of its own (choice j samples with seed + j); their sessions
    share the prompt's KV on the tiers: routing places them on one replica (prompt
    affinity, coordinator/routing.py), where one computes the prompt and the others copy
    its rows (core/kv_fork.py)."""

    def __init__(self, coordinator: Coordinator, specs: list[RequestSpec]) -> None:
        self.results = [GenerationResult() for _ in specs]
        self.streams = [
            cast(AsyncGenerator[Chunk, None], coordinator.stream(spec, result))
            for spec, result in zip(specs, self.results)
        ]

    async def __aiter__(self) -> AsyncIterator[tuple[int, Chunk | None]]:
        if len(self.streams) == 1:
            async with aclosing(self.streams[0]) as chunks:
                async for chunk in chunks:
                    yield 0, chunk
            yield 0, None
            return
        queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: AsyncGenerator[Chunk, None]) -> None:
            try:
                async with aclosing(stream) as chunks:
                    async for chunk in chunks:
                        await queue.put((i, chunk))
                await queue.put((i, None))
            except Exception as exc:
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item is None
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled if the client goes away first (its sessions are released)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ApiError(499, "client closed the request", "client_closed")
        return task.result()
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


def _authorize(request: Request) -> bytes | None:
    """The caller's API key digest (None when no keys are configured); 401 without a known
    key. /health and /metrics stay open, like the gRPC port's health check."""
    policy: AccessPolicy = request.app.state.policy
    if not policy.digests():
        return None
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    digest = policy.key_ok(key.strip()) if scheme.lower() == "bearer" else None
    if digest is None:
        raise ApiError(
            401,
            "missing or unknown API key (Authorization: Bearer KEY)",
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
    return digest


Key = Annotated[bytes | None, Depends(_authorize)]  # a dependency: checked before the body is validated


def create_app(coordinator: Coordinator, settings: Settings, draining: Callable[[], bool] = lambda: False) -> FastAPI:
    policy = access_policy("coordinator", settings)  # the gRPC port's API keys
    calls: Counter[bytes] = Counter()  # requests in flight per API key digest
    token_text = TokenText(coordinator.tokenizer)
    model_id = settings.model
    aliases = {model_id, Path(model_id.rstrip("/")).name}
    created = int(time.time())
    app = FastAPI(
        title="specdec",
        summary="OpenAI-compatible API over distributed speculative decoding",
        max_body_size=settings.max_request_bytes,
    )
    app.state.policy = policy

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (no such route, wrong method, a body over max_body_size) in OpenAI's shape
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @contextlib.contextmanager
    def key_call(digest: bytes | None) -> Iterator[None]:
        """One call of the key's at most SPECDEC_API_KEY_MAX_CALLS in flight (429 past it)."""
        if digest is None or not policy.max_calls_per_key:
            yield
            return
        if calls[digest] >= policy.max_calls_per_key:
            raise ApiError(
                429,
                f"at most {policy.max_calls_per_key} concurrent calls per API key",
                "rate_limit_error",
                None,
                "too_many_calls",
            )
        calls[digest] += 1
        try:
            yield
        finally:
            calls[digest] -= 1
            if calls[digest] <= 0:
                del calls[digest]

    def check_model(name: str | None) -> str:
        if name is None or name in aliases:
            return name or model_id
        raise UnknownModel(f"The model `{name[:200]}` does not exist; this server serves `{model_id}`")

    def model_card() -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "specdec",
            "max_model_len": coordinator.limits.max_context,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        # replicas() reads the registry when its view is stale (at most once a second), so
        # the first /health after start already counts the tiers
        tiers = {pool.tier: len(await pool.replicas()) for pool in (coordinator.draft_pool, coordinator.target_pool)}
        status = "draining" if draining() else "ok"
        return JSONResponse(
            {
                "status": status,
                "replicas": tiers,
                "active_requests": coordinator.active,
                "queued_requests": coordinator.admission.waiting,
            },
            503 if draining() else 200,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(_key: Key) -> dict[str, Any]:
        card = model_card()
        card["drafters"] = ["none", *await coordinator.drafters()]  # extension: what `speculation.drafter` takes
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, _key: Key) -> dict[str, Any]:
        try:
            check_model(name)
        except UnknownModel as exc:
            raise api_error(exc) from None
        return model_card()

    async def run(
        request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool, digest: bytes | None
    ) -> Response:
        held = contextlib.ExitStack()
        held.enter_context(key_call(digest))
        try:
            response = await _run(request, body, chat)
        except BaseException:
            held.close()
            raise
        if isinstance(response, EventSourceResponse):  # the key's call lasts as long as its stream
            response.background = BackgroundTask(held.close)
        else:
            held.close()
        return response

    async def _run(request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> Response:
        try:
            name = check_model(body.model)
            specs = body.to_specs(coordinator.limits.max_new_tokens)
        except Exception as exc:
            raise api_error(exc, body) from None
        n = body.n  # choices per prompt (completions may have several prompts)
        choices = Choices(coordinator, specs)
        rid = new_id("chatcmpl" if chat else "cmpl")
        logprobs = Logprobs(token_text, chat) if specs[0].logprobs is not None else None
        if body.stream:
            return await _stream(body, choices, rid, name, n, chat, logprobs)
        try:
            texts = await _until_disconnected(request, _collect(choices))
        except Exception as exc:
            raise api_error(exc, body) from None
        out = envelope("chat.completion" if chat else "text_completion", rid, name)
        out["choices"] = [
            _choice(
                i,
                texts[i],
                result.finish_reason,
                chat,
                None if logprobs is None else logprobs(result.token_ids, result.logprobs),
            )
            for i, result in enumerate(choices.results)
        ]
        out["usage"] = usage(prompt_tokens([r.stats for r in choices.results], n), [r.stats for r in choices.results])
        return JSONResponse(out)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest, key: Key) -> Response:
        return await run(request, body, False, key)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest, key: Key) -> Response:
        return await run(request, body, True, key)

    return app


async def _collect(choices: Choices) -> list[str]:
    async for _ in choices:
        pass
    return [result.text for result in choices.results]


def _choice(i: int, text: str, reason: str, chat: bool, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    if chat:
        return {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish_reason(reason),
        }
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


class TokenText:
    """A token id's text, as OpenAI's logprobs name tokens (decoded alone, as vLLM does)."""

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer, self.cache = tokenizer, dict[int, str]()

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            decoded = self.tokenizer.decode([token_id])
            text = self.cache[token_id] = decoded if isinstance(decoded, str) else "".join(decoded)
        return text


class Logprobs:
    """The core's TokenLogprobs in OpenAI's shapes: chat's `{"content": [...]}`, or the
    completions API's parallel lists (`text_offset` counted per choice across chunks)."""

    def __init__(self, text: TokenText, chat: bool) -> None:
        self.text, self.chat = text, chat
        self.offsets: dict[int, int] = {}  # completions: characters so far, per choice

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.text(token_id)
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode())}

    def __call__(self, ids: list[int], logprobs: list[TokenLogprob], choice: int = 0) -> dict[str, Any]:
        if self.chat:
            return {
                "content": [
                    {**self._entry(t, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top]}
                    for t, lp in zip(ids, logprobs)
                ],
                "refusal": None,
            }
        tokens = [self.text(t) for t in ids]
        offsets = []
        for token in tokens:
            offsets.append(self.offsets.get(choice, 0))
            self.offsets[choice] = offsets[-1] + len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [max(lp.logprob, MIN_LOGPROB) for lp in logprobs],
            "top_logprobs": [{self.text(i): max(v, MIN_LOGPROB) for i, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }


async def _stream(
    body: CompletionRequest | ChatCompletionRequest,
    choices: Choices,
    rid: str,
    model: str,
    n: int,
    chat: bool,
    logprobs: Logprobs | None,
) -> Response:
    """Server-sent events in OpenAI's chunk shapes; the first chunk is awaited before the
    response starts, so refusals keep their status code."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    include_usage = body.include_usage
    events = aiter(choices)
    try:
        first = await anext(events)
    except Exception as exc:
        await events.aclose()  # type: ignore[attr-defined]
        raise api_error(exc, body) from None

    def chunk(i: int, text: str | None, reason: str | None = None, role: bool = False, c: Chunk | None = None) -> str:
        out = envelope(kind, rid, model, created)
        lps = None if logprobs is None or c is None else logprobs(c.token_ids, chunk_logprobs(c), i)
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            out["choices"] = [{"index": i, "delta": delta, "logprobs": lps, "finish_reason": reason}]
        else:
            out["choices"] = [{"index": i, "text": text or "", "logprobs": lps, "finish_reason": reason}]
        if include_usage:
            out["usage"] = None
        return json.dumps(out)

    async def sse() -> AsyncIterator[str]:
        try:
            if chat:
                for i in range(len(choices.results)):
                    yield chunk(i, None, role=True)
            item: tuple[int, Chunk | None] | None = first
            while item is not None:
                i, c = item
                if c is None:
                    yield chunk(i, None if chat else "", finish_reason(choices.results[i].finish_reason))
                elif c.text or (logprobs is not None and c.token_ids):
                    yield chunk(i, c.text, c=c)
                item = await anext(events, None)
            if include_usage:
                stats = [r.stats for r in choices.results]
                out = envelope(kind, rid, model, created)
                out["choices"], out["usage"] = [], usage(prompt_tokens(stats, n), stats)
                yield json.dumps(out)
        except Exception as exc:  # after the headers: OpenAI's error object as an event
            yield json.dumps(api_error(exc, body).body())
        finally:
            # A client that went away cancels this generator: close the coordinator's streams
            # (releasing their sessions on the tiers) shielded from that cancellation.
            with anyio.CancelScope(shield=True):
                await events.aclose()  # type: ignore[attr-defined]
        yield "[DONE]"

    return EventSourceResponse(sse(), ping=SSE_PING_S, sep="\n")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        # The coordinator's own SIGTERM handler drains gRPC and HTTP together (TierServer.stop).
        yield


class HttpFront:
    """The HTTP server as a companion of the coordinator's TierServer: started before the
    coordinator reports SERVING, drained with its gRPC server on SIGTERM."""

    def __init__(self, coordinator: Coordinator, settings: Settings) -> None:
        self.settings = settings
        self.draining = False
        self.app = create_app(coordinator, settings, lambda: self.draining)
        tls = tls_files(settings)
        self.scheme = "https" if tls.enabled else "http"
        tls_options: dict[str, Any] = {}
        self.tls = tls
        if tls.enabled:  # TLS as on the gRPC port; rotated files are re-read by _reload_tls
            tls_options = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
            if settings.tls_client_auth and tls.ca:
                tls_options |= {"ssl_ca_certs": tls.ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
            **tls_options,
        )
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._reloader: asyncio.Task[None] | None = None
        self.address = ""

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.http_port))  # OSError here: the port is taken
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        host = self.settings.advertise_host or self.settings.host
        self.address = f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{port}/v1"
        self._server = _Uvicorn(self.config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP front stopped while starting")
            await asyncio.sleep(0.01)
        if self.tls.enabled:
            self._reloader = asyncio.create_task(self._reload_tls())
        log.info("OpenAI-compatible HTTP front on %s", self.address)

    async def _reload_tls(self) -> None:
        """uvicorn reads the certificate once; cert-manager rewrites the mounted files in
        place. Load them into the live SSLContext when they change: every new handshake
        gets the new chain. A new CA is added to those trusted for client certificates (an
        SSLContext cannot forget one: the old CA stays trusted until the next restart)."""
        seen = self.tls.mtimes()
        while True:
            await asyncio.sleep(TLS_POLL_S)
            try:
                mtimes = self.tls.mtimes()
                if mtimes == seen:
                    continue
                context = self.config.ssl
                assert context is not None
                context.load_cert_chain(self.tls.cert, self.tls.key)
                if self.settings.tls_client_auth and self.tls.ca:
                    context.load_verify_locations(self.tls.ca)
            except (OSError, ssl.SSLError) as exc:  # a rotation half way: keep serving, look again
                log.warning("HTTP front: TLS files unreadable, keeping the current certificate: %s", exc)
                continue
            seen = mtimes
            log.info("HTTP front: TLS certificate files changed: reloaded")

    async def stop(self, grace_s: float) -> None:
        if self._server is None or self._task is None:
            return
        self.draining = True
        if self._reloader is not None:
            self._reloader.cancel()
        self.config.timeout_graceful_shutdown = math.ceil(grace_s)
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
