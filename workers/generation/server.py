"""OpenAI-compatible HTTP API over the generation engine (FastAPI + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /generate (the shape
Atropos' `vllm` server type reads), GET /metrics (Prometheus text).

Every response carries `policy_version` (the oldest adapter version among its tokens) and, per choice, the exact
completion `token_ids`, their sampling `token_logprobs` and `policy_versions`, which the learner trains on.
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Every request field is range-checked by
the request models below, so a caller's mistake (a wrong type, a number out of range, NaN, text holding a lone
surrogate, too many or too long stop strings, token ids outside the vocabulary, a prompt longer than the context) is
a 400 (404 for an unknown model) and never reaches the engine; 5xx means our fault (500: one request failed inside
the engine, the rest of the batch went on; 503: the engine is not running or this worker is catching up).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from runner.webserver import BodyLimit
from workers.generation.engine import (
    Engine,
    EngineStopped,
    Overloaded,
    SamplingParams,
    completion_text,
    new_request_id,
)
from workers.generation.engine import (
    Request as EngineRequest,
)

log = logging.getLogger(__name__)

MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 2**20  # a prompt's or message's text, at most (and see Server.max_prompt_chars)
MAX_PROMPT_IDS = 2**20
MAX_MESSAGES = 4096
MAX_NAME_CHARS = 256
MAX_SEED = 2**63 - 1  # seed + choice index seeds choice i, and mx.random.key takes 0 <= seed < 2**64
# Below this temperature sampling is greedy, as in vLLM: 1/T would overflow float32 and make every log-prob NaN.
MIN_TEMPERATURE = 1e-5
# A nucleus of top_p <= 1e-6 is the top token alone for any vocabulary under a million (its probability is at least
# 1/vocab), and a smaller top_p underflows in float32: so it is raised to this.
MIN_TOP_P = 1e-6


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": _printable(message), "type": kind, "param": _printable(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _printable(text: str | None) -> str | None:
    """Text that encodes as UTF-8: an error message can quote the caller's input, lone surrogates included."""
    return text if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _unicode(text: str) -> str:
    """Refuse text that is not Unicode: JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode)]
PromptText = Annotated[Text, Field(max_length=MAX_PROMPT_CHARS)]
StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_PROMPT_IDS)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[Text, Field(max_length=MAX_NAME_CHARS)] | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0.0, le=5.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stream: StrictBool = False

    @field_validator("n", "temperature", "top_p", "stream", "echo", "logprobs", mode="before", check_fields=False)
    @classmethod
    def _null_is_the_default(cls, value, info):
        """OpenAI takes null for these, meaning the default."""
        return cls.model_fields[info.field_name].default if value is None else value


class CompletionBody(SamplingFields):
    prompt: PromptText | TokenIds | Annotated[list[PromptText], Field(max_length=1)]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Annotated[Text, Field(max_length=MAX_NAME_CHARS)]
    text: PromptText | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: PromptText | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)]


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class PromptTokenIds(BaseModel):
    prompt_token_ids: Annotated[TokenIds, Field(min_length=1)]


class GenerateBody(SamplingFields):
    """Atropos' `vllm` server type: prompt token ids in, per-token {id: logprob} out."""

    prompt: PromptTokenIds | PromptText
    logprobs: StrictInt | None = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


def _stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)


def _message_text(content: str | list[ContentPart]) -> str:
    if isinstance(content, str):
        return content
    if any(part.type != "text" or part.text is None for part in content):
        raise APIError(400, "only text content parts are supported", param="messages")
    return "".join(part.text for part in content)


def stream_delta(text: str, sent: int, stops: tuple[str, ...], final: bool) -> tuple[str, int]:
    """The next piece of streamed text: everything new in `text` except what might still turn out to be an
    incomplete UTF-8 character or the start of a stop string (held back until it is certain)."""
    end = len(text)
    if not final:
        while end > sent and text[end - 1] == "\ufffd":
            end -= 1
        for s in stops:
            for k in range(min(len(s) - 1, end - sent), 0, -1):
                if text[end - k : end] == s[:k]:
                    end -= k
                    break
    return text[sent:end], max(end, sent)


class Server:
    """Binds an engine to the HTTP routes."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        max_tokens_default: int = 64,
        max_tokens_limit: int = 4096,
        api_token: str = "",
        ready: bool = True,
    ):
        self.engine = engine
        self.model_name = model_name
        self.max_tokens_default = max_tokens_default
        self.max_tokens_limit = max_tokens_limit
        self.api_token = api_token
        self.ready = ready  # False while a worker catches up with the latest adapter: no traffic yet
        # A text longer than this cannot fit the context (no token stands for more characters than the vocabulary's
        # longest string; twice that for tokenizers that drop characters), so it is refused before it is tokenized:
        # tokenizing runs on the event loop, and a megabyte of text takes a second.
        self.max_prompt_chars = 2 * engine.context_length * max(map(len, engine.tokenizer.get_vocab()), default=1)
        self.started = time.time()
        self.app = self._build_app()

    # ----- helpers ---------------------------------------------------------------------------------------------
    def _params(self, body: SamplingFields, max_tokens: int | None, top_logprobs: int) -> SamplingParams:
        if body.model not in (None, "", self.model_name):
            raise APIError(
                404,
                f"model '{body.model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )
        max_tokens = self.max_tokens_default if max_tokens is None else max_tokens
        if max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {max_tokens} exceeds this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if body.temperature < MIN_TEMPERATURE else body.temperature,
            top_p=max(body.top_p, MIN_TOP_P),
            stop=_stop_list(body.stop),
            seed=body.seed,
            top_logprobs=top_logprobs,
        )

    def _submit(self, prompt_ids: list[int], params: SamplingParams, n: int, stream: bool) -> EngineRequest:
        if not self.ready:
            raise APIError(
                503, "this worker is catching up with the latest adapter; retry shortly", headers={"Retry-After": "1"}
            )
        try:
            return self.engine.submit(prompt_ids, params, n=n, stream=stream, loop=asyncio.get_running_loop())
        except Overloaded as e:
            raise APIError(429, str(e), headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def _wait(self, http: Request, req: EngineRequest) -> None:
        """Wait for every completion; a client that disconnects frees its slots at once."""
        gone = asyncio.ensure_future(_client_gone(http))
        remaining = req.n
        try:
            while remaining:
                event = asyncio.ensure_future(req.events.get())
                await asyncio.wait((event, gone), return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    self.engine.cancel(req)
                    raise APIError(499, "client disconnected")
                kind = event.result()[0]
                if kind == "done":
                    self._finish_text(req, event.result()[1])
                    remaining -= 1
                elif kind == "error":  # ("error", message, status): this request failed, or the engine died (503)
                    raise APIError(event.result()[2], event.result()[1])
        finally:
            gone.cancel()

    def _usage(self, req: EngineRequest) -> dict:
        completion = sum(len(c.token_ids) for c in req.completions)
        return {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": completion,
            "total_tokens": len(req.prompt_ids) + completion,
        }

    def _token_str(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _encode(self, text: str, param: str = "prompt") -> list[int]:
        self._check_length(len(text), param)
        return self.engine.tokenizer.encode(text)

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"{param} is {chars} characters long, more than the {self.engine.context_length}-token context "
                f"of this model can hold (at most {self.max_prompt_chars})",
                param=param,
            )

    def _encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._encode(prompt)
        if prompt and all(isinstance(p, int) for p in prompt):
            return list(prompt)
        if len(prompt) == 1:
            return self._encode(prompt[0])
        raise APIError(400, "prompt must be a string, a list of token ids, or a list with one string", param="prompt")

    def _chat_prompt(self, body: ChatBody) -> list[int]:
        messages = [{"role": m.role, "content": _message_text(m.content)} for m in body.messages]
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            return list(self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # a template can reject a conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None

    # ----- streaming -------------------------------------------------------------------------------------------
    def _stream(self, req: EngineRequest, chunk, first: dict | None = None) -> StreamingResponse:
        """Server-sent events: `first` (if any), then `chunk(index, delta, finish_reason)` per choice as its text
        grows, then `[DONE]`. A client that goes away cancels the request."""

        async def events():
            sent = [0] * req.n
            remaining = req.n
            try:
                if first:
                    yield _sse(first)
                while remaining:
                    batch = await _next_events(req.events)
                    errors = [e for e in batch if e[0] == "error"]
                    if errors:  # the 200 is sent already: the error is the stream's last event
                        _, message, status = errors[0]
                        kind = "invalid_request_error" if status < 500 else "server_error"
                        yield _sse({"error": {"message": message, "type": kind, "param": None, "code": None}})
                        return
                    finished = {e[1] for e in batch if e[0] == "done"}
                    for index in dict.fromkeys(e[1] for e in batch):  # each touched choice once, in event order
                        c = req.completions[index]
                        final = index in finished
                        text = self._finish_text(req, index) if final else self._partial_text(c.token_ids)
                        delta, sent[index] = stream_delta(text, sent[index], req.params.stop, final)
                        if delta or final:
                            yield _sse(chunk(index, delta, c.finish_reason if final else None))
                    remaining -= len(finished)
                yield "data: [DONE]\n\n"
            finally:
                if remaining:
                    self.engine.cancel(req)

        return StreamingResponse(events(), media_type="text/event-stream")

    def _finish_text(self, req: EngineRequest, index: int) -> str:
        c = req.completions[index]
        c.text = completion_text(self.engine.tokenizer, self.engine.eos_ids, c, req.params.stop)
        return c.text

    def _partial_text(self, token_ids: list[int]) -> str:
        """Text of a completion still being generated, decoded the way its final text will be (an EOS that ends
        it is not text)."""
        ids = list(token_ids)  # a snapshot: the engine thread appends concurrently
        if ids and ids[-1] in self.engine.eos_ids:
            ids.pop()
        return self.engine.tokenizer.decode(ids)

    # ----- routes ----------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="runner generation worker")
        app.add_exception_handler(APIError, _api_error)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)
        app.add_exception_handler(Exception, _internal_error)
        if self.api_token:
            app.add_middleware(BearerAuth, token=self.api_token, open_paths=("/health",))
        app.add_middleware(BodyLimit)  # outermost: a body too large is refused before anything reads it
        app.get("/health")(self.health)
        app.get("/v1/models")(self.models)
        app.get("/metrics")(self.metrics)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/generate")(self.generate)
        return app

    async def health(self) -> JSONResponse:
        """200 "ok" while serving; 503 "loading" before, and "failed" once the engine thread died (nothing will be
        generated: the worker reports itself failed and exits, to be restarted)."""
        try:
            state = await self._ask("health")
        except (asyncio.TimeoutError, EngineStopped):  # an engine in another process that does not answer
            state = {"failed": True, "version": self.engine.version}
        status = "failed" if state["failed"] else "ok" if self.ready else "loading"
        body = {"status": status, "adapter_version": state["version"], "model": self.model_name}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def models(self) -> dict:
        model = {
            "id": self.model_name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "runner",
            "adapter_version": self.engine.version,
        }
        return {"object": "list", "data": [model]}

    async def metrics(self) -> PlainTextResponse:
        try:
            text = await self._ask("metrics")
        except (asyncio.TimeoutError, EngineStopped):
            raise APIError(503, "the engine did not answer") from None
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def _ask(self, what: str):
        """`engine_answer` of the engine: here, or over the pipe when it is in another process (RemoteEngine)."""
        if isinstance(self.engine, Engine):
            return engine_answer(self.engine, what)
        return await self.engine.query(what)

    async def completions(self, body: CompletionBody, http: Request):
        top = body.logprobs or 0
        params = self._params(body, body.max_tokens, top)
        req = self._submit(self._encode_prompt(body.prompt), params, body.n, body.stream)
        rid, created = new_request_id("cmpl"), int(time.time())
        if body.stream:

            def chunk(index: int, delta: str, finish: str | None) -> dict:
                choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": None}
                return self._chunk(rid, "text_completion", created, [choice])

            return self._stream(req, chunk)
        await self._wait(http, req)
        choices = [
            _choice(c, {"text": c.text}, self._completion_logprobs(c, top) if body.logprobs is not None else None)
            for c in req.completions
        ]
        return self._response(rid, "text_completion", created, req, choices)

    async def chat_completions(self, body: ChatBody, http: Request):
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        params = self._params(body, body.max_completion_tokens or body.max_tokens, top)
        req = self._submit(self._chat_prompt(body), params, body.n, body.stream)
        rid, created = new_request_id("chatcmpl"), int(time.time())
        if body.stream:

            def chunk(index: int, delta: str, finish: str | None) -> dict:
                choice = {"index": index, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
                return self._chunk(rid, "chat.completion.chunk", created, [choice])

            opening = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(req.n)
            ]
            return self._stream(req, chunk, first=self._chunk(rid, "chat.completion.chunk", created, opening))
        await self._wait(http, req)
        choices = [
            _choice(
                c,
                {"message": {"role": "assistant", "content": c.text}},
                self._chat_logprobs(c, top) if body.logprobs else None,
            )
            for c in req.completions
        ]
        return self._response(rid, "chat.completion", created, req, choices)

    async def generate(self, body: GenerateBody, http: Request):
        """Atropos' `vllm` server type: per token, [{sampled id: logprob}] plus {id: logprob} of the top
        alternatives when asked for."""
        if body.stream:
            raise APIError(400, "/generate does not stream; use /v1/completions", param="stream")
        top = body.logprobs or 0
        params = self._params(body, body.max_tokens, top)
        prompt_ids = self._encode(body.prompt) if isinstance(body.prompt, str) else body.prompt.prompt_token_ids
        req = self._submit(prompt_ids, params, body.n, False)
        await self._wait(http, req)
        logprobs = [
            [
                [{str(t): lp}, {str(k): v for k, v in alternatives.items()}] if top else [{str(t): lp}]
                for t, lp, alternatives in _positions(c, top)
            ]  # the sampled token first, as Atropos reads item[0]
            for c in req.completions
        ]
        return _json(
            {
                "text": [c.text for c in req.completions],
                "logprobs": logprobs,
                "finish_reasons": [c.finish_reason for c in req.completions],
                "token_ids": [c.token_ids for c in req.completions],
                "prompt_token_ids": prompt_ids,
                "policy_version": req.policy_version,
                "policy_versions": [c.versions for c in req.completions],
            }
        )

    # ----- response formatters ---------------------------------------------------------------------------------
    def _response(self, rid: str, kind: str, created: int, req: EngineRequest, choices: list[dict]) -> JSONResponse:
        """A finished completion or chat completion: the OpenAI envelope plus the oldest policy version used and, as
        vLLM sends it, the prompt's token ids (verifiers reads them to train on a chat rollout)."""
        body = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices}
        return _json(
            {
                **body,
                "usage": self._usage(req),
                "policy_version": req.policy_version,
                "prompt_token_ids": req.prompt_ids,
            }
        )

    def _chunk(self, rid: str, kind: str, created: int, choices: list[dict]) -> dict:
        """One streamed event, stamped with the adapter version being served when it is sent."""
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": self.model_name,
            "policy_version": self.engine.version,
            "choices": choices,
        }

    def _completion_logprobs(self, c, top: int) -> dict:
        """Legacy completions' `logprobs`: token strings, their log-probs, text offsets and top alternatives."""
        tokens = [self._token_str(t) for t in c.token_ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": c.logprobs,
            "text_offset": offsets,
            "top_logprobs": [{self._token_str(k): v for k, v in d.items()} for d in c.top_logprobs] if top else None,
        }

    def _chat_logprobs(self, c, top: int) -> dict:
        """Chat completions' `logprobs.content`: one entry per token with its top alternatives."""

        def entry(token_id: int, logprob: float) -> dict:
            text = self._token_str(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in alternatives.items()]}
                for t, lp, alternatives in _positions(c, top)
            ]
        }


def _positions(c, top: int) -> list[tuple[int, float, dict[int, float]]]:
    """Per generated token: (token id, its sampling log-prob, {id: log-prob} of the top alternatives or {})."""
    return [(t, lp, c.top_logprobs[i] if top else {}) for i, (t, lp) in enumerate(zip(c.token_ids, c.logprobs))]


def _choice(c, content: dict, logprobs: dict | None) -> dict:
    """One finished choice: OpenAI's fields plus the exact tokens, log-probs and versions the learner trains on."""
    return {
        "index": c.index,
        **content,
        "finish_reason": c.finish_reason,
        "logprobs": logprobs,
        "token_ids": c.token_ids,
        "token_logprobs": c.logprobs,
        "policy_versions": c.versions,
    }


async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code, e.headers)


async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI's body validation errors as one OpenAI-shaped 400 naming an offending field: the first error that is
    not a plain type mismatch (of a union's alternatives, the one the value was meant for), its path without the
    union's internal tags."""
    errors = e.errors()
    first = next((x for x in errors if not x.get("type", "").endswith("_type")), errors[0] if errors else {})
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and (isinstance(x, int) or x.isidentifier()))
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        loc, message = "", "the request body is not valid JSON"
    elif first.get("type") == "model_attributes_type" and not loc:
        message = "the request body must be a JSON object (Content-Type: application/json)"
    return error_response(400, f"{loc}: {message}" if loc else message, param=loc or None)


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail))


async def _internal_error(_: Request, e: Exception) -> JSONResponse:
    """Our own fault, in OpenAI's shape too (Starlette still logs the traceback)."""
    return error_response(500, f"internal server error ({type(e).__name__}); the request itself may be fine")


async def _next_events(events: asyncio.Queue) -> list[tuple]:
    """Wait for one engine event, then take every other one already queued: a client that falls behind gets one
    chunk per choice for all its new tokens instead of one decode per token."""
    batch = [await events.get()]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


async def _client_gone(http: Request) -> None:
    """Return once the client has closed its connection. The body is already read, so the next ASGI message can
    only be `http.disconnect` (uvicorn delivers it as soon as the socket closes)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


class BearerAuth:
    """Pure ASGI middleware requiring `Authorization: Bearer <token>` (except on `open_paths`). Unlike
    `@app.middleware("http")` it does not wrap `receive`, so routes still see a client's disconnect, and it adds
    no per-request task group."""

    def __init__(self, app, token: str, open_paths: tuple[str, ...] = ()):
        self.app, self.expected, self.open_paths = app, f"Bearer {token}".encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong bearer token", code="invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _json(content: dict) -> JSONResponse:
    """A response of plain JSON types. Returning the dict itself would make FastAPI walk every nested token id and
    log-prob through `jsonable_encoder` first, holding the GIL the engine thread needs."""
    return JSONResponse(content)


def _sse(payload: dict | None) -> str:
    return f"data: {json.dumps(payload)}\n\n" if payload else ""


def engine_answer(engine: Engine, what: str):
    """What the HTTP side asks of an engine: "health" ({"failed", "version"}) or "metrics" (Prometheus text)."""
    if what == "health":
        return {"failed": engine.failed, "version": engine.version}
    if what == "metrics":
        return prometheus_text(engine)
    raise ValueError(f"unknown question {what!r}; expected 'health' or 'metrics'")


def prometheus_text(engine: Engine) -> str:
    """Engine counters and gauges in Prometheus' text exposition format."""
    s = engine.stats
    rows = [
        ("runner_requests_total", "counter", "Requests accepted.", s.requests_total),
        (
            "runner_requests_rejected_total",
            "counter",
            "Requests refused because the queue was full.",
            s.requests_rejected,
        ),
        ("runner_prompt_tokens_total", "counter", "Prompt tokens processed.", s.prompt_tokens_total),
        ("runner_generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens_total),
        ("runner_decode_steps_total", "counter", "Batched decode steps.", s.decode_steps_total),
        (
            "runner_decode_seconds_total",
            "counter",
            "Time spent in batch steps (prefill and decode).",
            round(engine.busy_seconds(), 6),
        ),
        ("runner_active_sequences", "gauge", "Sequences in the running batch.", s.active_sequences),
        (
            "runner_batch_occupancy_ratio",
            "gauge",
            "Running sequences over batch capacity.",
            round(s.active_sequences / engine.max_batch, 4),
        ),
        ("runner_queue_depth", "gauge", "Requests waiting to join the batch.", s.queued_requests),
        ("runner_adapter_version", "gauge", "Adapter version being served.", s.adapter_version),
        ("runner_adapter_switches_total", "counter", "Adapter versions installed.", s.adapter_switches_total),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def load_engine(
    model_path: str | Path,
    adapter_path: str | Path | None = None,
    lora_spec=None,
    dtype: str = "",
    **engine_kwargs,
):
    """Load a base model (a directory or hub id; quantized or float, cast to `dtype`) with mlx-lm, wrap it with LoRA
    when an adapter or a LoRA spec is given (lora_b = 0 keeps a fresh spec equal to the base), and build an engine
    around it."""

    from workers.lora import apply_lora, read_adapter, set_lora
    from workers.models import load_model

    model, tokenizer, _, path = load_model(model_path, dtype)
    if adapter_path:
        lora_spec, tensors = read_adapter(Path(adapter_path))
        apply_lora(model, lora_spec)
        set_lora(model, tensors)
    elif lora_spec is not None:
        apply_lora(model, lora_spec)
    return engine_over(model, tokenizer, path, **engine_kwargs)


def engine_over(model, tokenizer, model_dir: Path, **engine_kwargs):
    """An engine around a loaded model (switched to inference mode) of the model directory `model_dir`."""
    import mlx.core as mx

    mx.eval(model.parameters())
    model.eval()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    context = int(config.get("max_position_embeddings") or 2048)
    engine = Engine(model, tokenizer, context_length=context, **engine_kwargs)
    engine.model_dir = Path(model_dir)  # where the HTTP front (workers.generation.front) loads the same tokenizer
    return engine


def run_http(server: Server, host: str, port: int, on_started=None) -> None:
    """Run uvicorn in this thread until it is told to exit (SIGINT/SIGTERM)."""
    import uvicorn

    config = uvicorn.Config(
        server.app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    uv = uvicorn.Server(config)
    if on_started is not None:
        original = uv.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_started(uv)

        uv.startup = startup
    uv.run()
