"""The aiohttp application: OpenAI-compatible routes over one ``AsyncEngine``.

A thin layer: handlers validate (``protocol``), admit through the engine, and answer
(``streaming``/``responses``). Every failure leaves as ``{"error": {...}}``: client mistakes as
4xx (decided before any SSE header), anything unexpected as a 500 that does not stop the server.
"""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from specserve.config import ServerConfig
from specserve.errors import RequestError
from specserve.server.async_engine import AsyncEngine, EngineState, EngineUnavailable, QueueFull
from specserve.server.metrics import ServerMetrics
from specserve.server.protocol import (
    ApiError,
    parse_generation_request,
    parse_json_body,
    parse_tokenize_request,
)
from specserve.server.responses import ResponseBuilder
from specserve.server.streaming import collect, stream_sse

OPEN_PATHS = ("/health", "/metrics")  # no API key needed
RETRY_AFTER_QUEUE_FULL_S = "1"
RETRY_AFTER_UNAVAILABLE_S = "5"
HTTP_ERRORS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error"}


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


class OpenAIServer:
    def __init__(self, config: ServerConfig, engine: AsyncEngine, metrics: ServerMetrics) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.log = logging.getLogger("specserve.server")

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self.error_middleware, self.auth_middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/tokenize", self.tokenize)
        return app

    # ---- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def error_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)
        except web.HTTPException as exc:  # routing (404, 405) and body size (413)
            if exc.status < 400:
                raise
            kind = HTTP_ERRORS.get(exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
            message = exc.reason
            if exc.status == 404:
                message = f"no route {request.method} {request.path}: see /v1/models, /v1/completions, /v1/chat/completions"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(exc.allowed_methods))}"
            elif exc.status == 413:
                message = "the request body is too large: send a shorter prompt"
            return error_response(ApiError(exc.status, message, type=kind))
        except Exception:  # a bug: answer 500, keep serving
            self.log.exception("unexpected error while handling %s %s", request.method, request.path)
            return error_response(ApiError(500, "the server hit an internal error; please report it",
                                           type="server_error", code="internal_error"))

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        key = self.config.api_key
        if key is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        return await handler(request)

    # ---- helpers -------------------------------------------------------------------------

    def _require_ready(self) -> None:
        state = self.engine.state
        if state == EngineState.READY:
            return
        message = {
            EngineState.LOADING: "the model is still loading: retry in a few seconds",
            EngineState.DRAINING: "the server is shutting down: send the request to another replica",
            EngineState.STOPPED: "the server is shutting down: send the request to another replica",
            EngineState.FAILED: "the model failed to load: see the server's log",
        }[state]
        raise ApiError(503, message, type="service_unavailable", code=state.value,
                       headers={"Retry-After": RETRY_AFTER_UNAVAILABLE_S})

    def _model_name(self, requested: str | None) -> str:
        served = self.config.served_model_name or self.engine.info.model_name
        if requested is not None and requested != served:
            raise ApiError(404, f"the model {requested!r} does not exist here: use {served!r} (see /v1/models)",
                           param="model", code="model_not_found")
        return served

    async def _json_body(self, request: web.Request) -> dict:
        content_type = request.headers.get("Content-Type")
        if content_type is not None:
            mime = content_type.split(";", 1)[0].strip().lower()
            if mime != "application/json" and not mime.endswith("+json"):
                raise ApiError(415, f"the body must be JSON, not {mime or 'an empty content type'}: "
                                    "send it with Content-Type: application/json")
        return parse_json_body(await request.read())

    # ---- routes --------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        self._require_ready()
        return web.json_response({"status": "ok"})

    async def metrics_text(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def models(self, request: web.Request) -> web.Response:
        self._require_ready()
        info = self.engine.info
        card = {"id": self._model_name(None), "object": "model", "created": int(time.time()),
                "owned_by": "specserve", "root": info.model_name, "max_model_len": info.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def tokenize(self, request: web.Request) -> web.Response:
        self._require_ready()
        parsed = parse_tokenize_request(await self._json_body(request))
        self._model_name(parsed.model)
        try:
            tokens = await self.engine.tokenize(parsed)
        except RequestError as exc:
            raise ApiError.bad_request(str(exc), exc.param) from None
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.info.max_model_len})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        arrival_time = time.perf_counter()
        self._require_ready()
        parsed = parse_generation_request(await self._json_body(request), kind)
        model_name = self._model_name(parsed.model)
        try:
            stream = await self.engine.add(parsed, arrival_time)
        except EngineUnavailable:
            self.metrics.requests_rejected.labels("unavailable").inc()
            self._require_ready()  # raises the 503 that fits the state
            raise
        except QueueFull:
            self.metrics.requests_rejected.labels("queue_full").inc()
            raise ApiError(429, f"the server is at capacity ({self.engine.capacity} sequences running or queued): "
                                f"retry after {RETRY_AFTER_QUEUE_FULL_S} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER_QUEUE_FULL_S}) from None
        except RequestError as exc:
            self.metrics.requests_rejected.labels("invalid").inc()
            raise ApiError.bad_request(str(exc), exc.param) from None
        builder = ResponseBuilder(parsed, model_name)
        try:
            if parsed.stream:
                return await stream_sse(request, stream, builder)
            finals = await collect(stream)
            return web.json_response(builder.response(finals, stream.num_prompt_tokens))
        finally:
            stream.close()  # aborts (and frees the KV blocks of) whatever did not finish
