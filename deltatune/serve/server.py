"""The OpenAI-compatible HTTP API of `deltatune serve`, as a FastAPI app over a
`GenerationEngine` and its `AdapterBank`: `/v1/models`, `/v1/completions`,
`/v1/chat/completions` (both streaming with server-sent events), and `/v1/adapters` to load and
unload adapters at run time. The request's `model` field picks the adapter (the base model's id
picks no adapter), as vLLM does, so requests for different adapters share batches.

Safety: the CLI binds to 127.0.0.1 unless told otherwise; with an API key every `/v1` call needs
`Authorization: Bearer KEY`; request bodies are capped (counted as they arrive, so a chunked body
cannot get past the cap), as are `max_tokens`, the prompt length and the number of stop strings;
adapters load only from inside the allowed directory. Every error is answered in OpenAI's error
shape with a 4xx status (5xx only for the server's own faults) and the server keeps serving.
`build_app` is separate from uvicorn so tests can drive the same app in process."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune.data.templates import raw_prompt_ids, render_prompt
from deltatune.errors import DeltatuneError
from deltatune.serve.bank import ADAPTER_NAME, AdapterBank
from deltatune.serve.engine import (GenerationEngine, GenerationEvent, GenerationRequest,
                                    SamplingParams)
from deltatune.serve.protocol import (AdapterLoadRequest, ApiError, ChatCompletionRequest,
                                      CompletionRequest, error_body)

LOG = logging.getLogger("deltatune.serve")
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\])$")
DEFAULT_COMPLETION_TOKENS = 16     # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256


@dataclass
class ServerLimits:
    api_key: str | None = None
    adapter_dir: Path | None = None
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 4096
    max_stop_sequences: int = 4


@dataclass
class ServerState:
    engine: GenerationEngine
    bank: AdapterBank
    tokenizer: Any
    base_id: str
    limits: ServerLimits = field(default_factory=ServerLimits)
    created: int = field(default_factory=lambda: int(time.time()))


# -- the guard in front of the app: API key and body size ------------------------------------

class RequestGuard:
    """Pure ASGI middleware: checks the API key, then reads the whole body while counting it
    (Content-Length first, then the bytes that really arrive) and replays it to the app."""

    def __init__(self, app: Any, limits: ServerLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        problem = self._check_key(scope, headers) or self._check_length(headers)
        if problem is not None:
            await _send_error(send, problem)
            return
        body, problem = await self._read_body(receive)
        if problem is not None:
            await _send_error(send, problem)
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_key(self, scope: dict, headers: dict[str, str]) -> ApiError | None:
        key = self.limits.api_key
        if key is None or not scope.get("path", "").startswith("/v1"):
            return None
        given = headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode("utf-8")):
            return ApiError(401, "missing or wrong API key: send the header 'Authorization: "
                            "Bearer <key>' with the key the server was started with",
                            code="invalid_api_key")
        return None

    def _check_length(self, headers: dict[str, str]) -> ApiError | None:
        length = headers.get("content-length")
        if length is None:
            return None
        if not length.strip().isdigit():
            return ApiError(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > self.limits.max_body_bytes:
            return _too_large(self.limits.max_body_bytes)
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, ApiError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                return b"", _too_large(self.limits.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes; send a shorter prompt (the "
                    "server's --max-body-bytes sets the limit)", code="request_too_large")


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: wait for the disconnect, as the app expects
    return replayed


async def _send_error(send: Any, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


# -- the app ---------------------------------------------------------------------------------

def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            # The engine finishes its current batch first: not on the event loop's thread.
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="deltatune serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    _add_error_handlers(app)
    _add_model_routes(app, state)
    _add_generation_routes(app, state)
    _add_adapter_routes(app, state)
    app.add_middleware(RequestGuard, limits=state.limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        status, message, param = _validation_message(error.errors())
        return JSONResponse(error_body(status, message, param), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"no such endpoint: {request.method} {request.url.path}; see "
                         "GET /v1/models, POST /v1/completions, POST /v1/chat/completions",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        message = messages.get(error.status_code, str(error.detail))
        return JSONResponse(error_body(error.status_code, message), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        LOG.exception("unexpected error")
        return JSONResponse(error_body(500, f"internal server error: {type(error).__name__}; "
                                       "the request was not processed"), status_code=500)


def _validation_message(errors: list[dict]) -> tuple[int, str, str | None]:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return 400, ("the request body is not valid JSON: " + first.get("msg", "")), None
    # pydantic names the union branch it tried ("str", "list[str]"): noise to a user.
    location = [str(part) for part in first.get("loc", ())
                if part != "body" and not _UNION_BRANCH.match(str(part))]
    if not location:
        return 400, ("the request body must be a JSON object with the fields of this endpoint "
                     "(sent with Content-Type: application/json)"), None
    where = ".".join(location)
    if first.get("type") == "missing":
        return 400, f"field '{where}' is required", location[0]
    return 400, f"field '{where}': {first.get('msg', 'invalid value')}", location[0]


def _add_model_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        entries = [{"id": state.base_id, "object": "model", "created": state.created,
                    "owned_by": "deltatune"}]
        entries += [{"id": name, "object": "model", "created": state.created,
                     "owned_by": "deltatune", "parent": state.base_id}
                    for name in state.bank.names()]
        return {"object": "list", "data": entries}


# -- generation ------------------------------------------------------------------------------

def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if not body.prompt:
            raise ApiError(400, "prompt is empty; send the text to continue", param="prompt")
        prompt_ids = raw_prompt_ids(body.prompt, state.tokenizer)
        return await _generate(state, body, prompt_ids, _CompletionFormat(body.model),
                               DEFAULT_COMPLETION_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        prompt_ids = _chat_prompt(state.tokenizer, body)
        return await _generate(state, body, prompt_ids, _ChatFormat(body.model),
                               DEFAULT_CHAT_TOKENS)


def _chat_prompt(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       param="messages")
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    roles = [m["role"] for m in messages]
    if roles[-1] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    if roles in (["user"], ["system", "user"]):
        # Exactly what `deltatune generate` and training feed the model for one question.
        system = messages[0]["content"] if roles[0] == "system" else None
        return render_prompt(messages[-1]["content"], tokenizer, "chat", system=system)
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
    except Exception as error:  # noqa: BLE001 - templates raise their own errors
        raise ApiError(400, "the model's chat template rejected these messages: "
                       f"{' '.join(str(error).splitlines())}", param="messages") from None
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids)


def _adapter_for(state: ServerState, model: str) -> str | None:
    if model == state.base_id:
        return None
    if model in state.bank:
        return model
    raise ApiError(404, f"model '{model}' does not exist; served: "
                   f"{[state.base_id, *state.bank.names()]} (GET /v1/models)",
                   param="model", code="model_not_found")


def _sampling(state: ServerState, body: Any, prompt_tokens: int,
              default_tokens: int) -> SamplingParams:
    limits = state.limits
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported; send several requests instead", param="n")
    context = min(limits.max_prompt_tokens + limits.max_tokens_limit, state.engine.max_context)
    # Without max_tokens, the default shrinks to what the context has left for this prompt.
    max_tokens = body.max_tokens if body.max_tokens is not None \
        else max(1, min(default_tokens, limits.max_tokens_limit, context - prompt_tokens))
    if max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of "
                       f"{limits.max_tokens_limit}", param="max_tokens")
    stops = body.stop_list()
    if len(stops) > limits.max_stop_sequences or any(not s for s in stops):
        raise ApiError(400, f"stop takes 1 to {limits.max_stop_sequences} non-empty strings",
                       param="stop")
    if prompt_tokens > limits.max_prompt_tokens or prompt_tokens + max_tokens > context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens and max_tokens is "
                       f"{max_tokens}: together at most {context} (prompt at most "
                       f"{limits.max_prompt_tokens}); shorten the prompt or lower max_tokens",
                       param="max_tokens")
    return SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature),
                          top_p=float(body.top_p), stop=stops, seed=body.seed)


async def _generate(state: ServerState, body: Any, prompt_ids: list[int], output: "_Format",
                    default_tokens: int):
    adapter = _adapter_for(state, body.model)
    params = _sampling(state, body, len(prompt_ids), default_tokens)
    events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    state.engine.submit(GenerationRequest(prompt_ids, adapter, params),
                        lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    if body.stream:
        # The first event decides the status: an error before any text is a plain 4xx/5xx.
        first = await events.get()
        if first.finish_reason == "error":
            raise _event_error(first)
        return StreamingResponse(_stream(first, events, output), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, last = [], None
    while last is None or not last.finished:
        last = await events.get()
        text.append(last.text)
    if last.finish_reason == "error":
        raise _event_error(last)
    return output.whole("".join(text), last)


def _event_error(event: GenerationEvent) -> ApiError:
    message = event.error or "generation failed"
    if "not loaded" in message:
        return ApiError(404, message + " (it was unloaded)", param="model",
                        code="model_not_found")
    return ApiError(400 if "empty" in message else 500, message)


async def _stream(event: GenerationEvent, events: "asyncio.Queue[GenerationEvent]",
                  output: "_Format") -> AsyncIterator[bytes]:
    head = output.first_chunk()
    if head is not None:
        yield _sse(head)
    while True:
        if event.finish_reason == "error":
            yield _sse(_event_error(event).body())
            break
        if event.text or event.finished:
            yield _sse(output.chunk(event.text, event.finish_reason if event.finished else None))
        if event.finished:
            break
        event = await events.get()
    yield b"data: [DONE]\n\n"


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _usage(event: GenerationEvent) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class _Format:
    """The response objects of one endpoint (whole answer and streamed chunks)."""

    def __init__(self, model: str):
        self.model = model
        self.created = int(time.time())
        self.id = self.prefix + uuid.uuid4().hex

    prefix = ""

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def first_chunk(self) -> dict | None:
        return None


class _CompletionFormat(_Format):
    prefix = "cmpl-"

    def whole(self, text: str, event: GenerationEvent) -> dict:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": text, "finish_reason": event.finish_reason,
                             "logprobs": None}], "usage": _usage(event)}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                             "logprobs": None}]}


class _ChatFormat(_Format):
    prefix = "chatcmpl-"

    def whole(self, text: str, event: GenerationEvent) -> dict:
        return {**self.head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": event.finish_reason, "logprobs": None}],
                "usage": _usage(event)}

    def first_chunk(self) -> dict:
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None, "logprobs": None}]}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                             "logprobs": None}]}


# -- adapters at run time --------------------------------------------------------------------

def _add_adapter_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"object": "list", "data": [asdict(info) for info in state.bank.info()]}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoadRequest) -> dict:
        _check_new_name(state, body.name)
        folder = _allowed_path(state.limits.adapter_dir, body.path)
        info = await _on_engine(state, lambda: state.bank.load(body.name, folder))
        return {"object": "adapter", **asdict(info)}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        if name not in state.bank:
            raise ApiError(404, f"no adapter named '{name}' is loaded; loaded: "
                           f"{state.bank.names()}", param="name", code="model_not_found")
        await _on_engine(state, lambda: state.bank.unload(name))
        return {"object": "adapter", "id": name, "deleted": True}


def _check_new_name(state: ServerState, name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name) or name == state.base_id:
        raise ApiError(400, f"adapter name {name!r} is not allowed: 1-64 characters from "
                       "A-Z a-z 0-9 . _ - and not the base model's id", param="name")
    if name in state.bank:
        raise ApiError(409, f"an adapter named '{name}' is already loaded; DELETE "
                       f"/v1/adapters/{name} first or pick another name", param="name")


def _allowed_path(adapter_dir: Path | None, path: str) -> Path:
    if adapter_dir is None:
        raise ApiError(403, "loading adapters at run time is off: start the server with "
                       "--adapter-dir DIR to allow adapters from inside DIR", param="path")
    root = adapter_dir.resolve()
    try:
        candidate = Path(path)
        # resolve() follows symlinks and '..', so the check is on the real location.
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        inside = resolved == root or root in resolved.parents
        is_dir = inside and resolved.is_dir()
    except (ValueError, OSError) as error:  # a NUL byte, a name too long, a loop of links
        raise ApiError(400, f"adapter path {path!r} cannot be used ({error})",
                       param="path") from None
    if not inside:
        raise ApiError(403, f"adapter path {path!r} is outside the allowed directory "
                       f"{str(root)!r}", param="path")
    if not is_dir:
        raise ApiError(400, f"adapter path {path!r} is not a folder inside the allowed "
                       "directory", param="path")
    return resolved


async def _on_engine(state: ServerState, fn: Any) -> Any:
    try:
        return await asyncio.wrap_future(state.engine.call_between_batches(fn))
    except DeltatuneError as error:
        raise ApiError(400, " ".join(str(error).splitlines())) from None


__all__ = ["ServerLimits", "ServerState", "build_app", "RequestGuard"]
