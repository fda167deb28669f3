"""The two generation endpoints: validated body -> admitted Generation -> JSON body or SSE stream.

Completions and chat completions differ only in how the prompt is made (text/ids vs chat template)
and in the shape of their response objects; `CompletionFormat` and `ChatFormat` hold the difference.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from faasmoe.model.sampling import SamplingParams
from faasmoe.server.generation import Delta, Generation, GenerationFailed
from faasmoe.server.middleware import request_id
from faasmoe.server.platform import Platform
from faasmoe.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, completion_id
from faasmoe.server.sequence import Failure, FailureKind, Sequence, TokenEvent
from faasmoe.server.tenants import QuotaExceeded, Tenant

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
RETRY_UNAVAILABLE_S = 1  # Retry-After of a 503: the gateway client has already retried for a while


async def create(
    platform: Platform, tenant: Tenant, body: CompletionRequest | ChatCompletionRequest, http: Request
) -> Response:
    generation = _start(platform, tenant, body, request_id(http.scope))
    fmt: _Format = (
        ChatFormat(platform, generation)
        if isinstance(body, ChatCompletionRequest)
        else CompletionFormat(platform, generation)
    )
    if body.stream:
        return GenerationStream(_sse(fmt, generation), generation)
    try:
        deltas = await _collect_unless_disconnected(generation, http)
    finally:
        generation.close()
    return JSONResponse(fmt.full(deltas, generation.completion_tokens))


class GenerationStream(StreamingResponse):
    """An SSE response that closes its generation however it ends: done, failed, or the client gone."""

    def __init__(self, content: AsyncIterator[bytes], generation: Generation) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def failure_error(failure: Failure, request_id: str) -> ApiError:
    """What a tenant is told of a failure: what failed and the request id, never internal detail."""
    see_log = f"the server log has the details under request id {request_id}"
    match failure.kind:
        case FailureKind.FUNCTION:
            return ApiError(502, f"expert function {failure.function!r} failed; {see_log}", type="server_error",
                            code="function_failed")  # fmt: skip
        case FailureKind.FUNCTION_UNAVAILABLE:
            return ApiError(503, f"expert function {failure.function!r} is unavailable; retry later ({see_log})",
                            type="server_error", code="function_unavailable",
                            headers={"Retry-After": str(RETRY_UNAVAILABLE_S)})  # fmt: skip
        case FailureKind.SEQUENCE:
            return ApiError(500, f"generating this request's tokens failed; {see_log}", type="server_error",
                            code="generation_failed")  # fmt: skip
        case _:
            return ApiError(500, f"the engine step failed; {see_log}", type="server_error", code="engine_failed")


def _check_model(platform: Platform, tenant: Tenant, body: CompletionRequest | ChatCompletionRequest) -> str:
    model = platform.settings.model_name
    if body.model != model:
        raise ApiError(
            404,
            f"model {body.model!r} does not exist; this server serves {model!r}",
            param="model",
            code="model_not_found",
        )
    if not tenant.may_use(model):
        raise ApiError(
            403,
            f"tenant {tenant.name} may not use model {model!r}",
            type="permission_error",
            param="model",
            code="model_not_allowed",
        )
    return model


def _prompt_ids(platform: Platform, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
    tokenizer = platform.model.tokenizer
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    elif isinstance(body.prompt, str):
        ids = tokenizer.encode(body.prompt)
    else:
        ids = body.prompt
        vocab = platform.model.vocab_size
        if bad := [i for i in ids if i >= vocab]:
            raise ApiError(
                400, f"prompt token ids must be below the vocabulary size {vocab}; got {bad[:5]}", param="prompt"
            )
    if not ids:
        raise ApiError(400, "the prompt has no tokens", param="prompt")
    if len(ids) > platform.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens, over the limit of {platform.max_prompt_tokens}",
            param="prompt",
            code="context_length_exceeded",
        )
    return ids


def _start(
    platform: Platform, tenant: Tenant, body: CompletionRequest | ChatCompletionRequest, request_id: str
) -> Generation:
    """The admitted, queued Generation; the quota it holds is released whatever raises on the way."""
    model = _check_model(platform, tenant, body)
    prompt_ids = _prompt_ids(platform, body)
    context = platform.model.checkpoint.config.max_position_embeddings
    room = context - len(prompt_ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(platform.settings.default_max_tokens, room)
    if max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) is over the context length of {context}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop_token_ids=() if body.ignore_eos else platform.model.eos_token_ids,
    )
    logprobs = body.logprobs_count if isinstance(body, ChatCompletionRequest) else body.logprobs
    seq = Sequence(tenant.name, prompt_ids, params, logprobs, request_id)
    engine = platform.orchestrator.engine_for(tenant.name)
    try:
        charge = tenant.admit(max_tokens, len(prompt_ids))
    except QuotaExceeded as exc:
        raise ApiError(
            429,
            str(exc),
            type="rate_limit_error",
            code="quota_exceeded",
            headers={"Retry-After": str(round(exc.retry_after_s))},
        ) from None
    platform.prewarm(tenant.name, len(prompt_ids))
    prefix = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
    generation = Generation(body, seq, engine, tenant, charge, platform.metrics, model, completion_id(prefix))
    try:
        generation.start()
    except BaseException:
        generation.close()
        raise
    return generation


async def _collect_unless_disconnected(generation: Generation, http: Request) -> list[Delta]:
    """All deltas; if the client disconnects first, the generation is cancelled (and its KV freed)."""

    async def collect() -> list[Delta]:
        return [delta async for delta in generation.deltas()]

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(http))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():
        work.cancel()
        raise ApiError(499, "client closed the request")
    try:
        return work.result()
    except GenerationFailed as exc:
        raise failure_error(exc.failure, generation.seq.request_id) from None


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _sse(fmt: _Format, generation: Generation) -> AsyncIterator[bytes]:
    """Server-sent events; an error mid-stream becomes an error event before [DONE]."""
    rid = generation.seq.request_id
    try:
        first = True
        async for delta in generation.deltas():
            yield _event(fmt.chunk(delta, first))
            first = False
        if fmt.body.include_usage:
            yield _event(fmt.usage_chunk(generation.completion_tokens))
    except GenerationFailed as exc:
        yield _event(failure_error(exc.failure, rid).body.model_dump())
    except Exception:  # e.g. formatting this request's chunk: the stream still ends well-formed
        log.exception("request %s: streaming failed", rid)
        yield _event(failure_error(Failure(FailureKind.SEQUENCE), rid).body.model_dump())
    yield SSE_DONE


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _Format:
    """What both endpoints' responses share: ids, usage, vLLM's token ids, logprob token strings."""

    object_full: str
    object_chunk: str

    def __init__(self, platform: Platform, generation: Generation) -> None:
        self.tokenizer = platform.model.tokenizer
        self.generation = generation
        self.body = generation.body
        self.prompt_ids = generation.seq.prompt_ids

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.generation.id,
            "object": obj,
            "created": self.generation.created,
            "model": self.generation.model,
            "choices": choices,
        }

    def usage(self, completion_tokens: int) -> dict:
        prompt = len(self.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def usage_chunk(self, completion_tokens: int) -> dict:
        return self.envelope(self.object_chunk, []) | {"usage": self.usage(completion_tokens)}

    def token_ids(self, deltas: list[Delta], first: bool) -> dict:
        if not self.body.return_token_ids:
            return {}
        ids = {"token_ids": [t.token_id for d in deltas for t in d.tokens]}
        return ids | ({"prompt_token_ids": self.prompt_ids} if first else {})

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def full(self, deltas: list[Delta], completion_tokens: int) -> dict:
        body = self.envelope(self.object_full, [self.choice(deltas)])
        return body | {"usage": self.usage(completion_tokens)}

    def choice(self, deltas: list[Delta]) -> dict:
        raise NotImplementedError

    def chunk(self, delta: Delta, first: bool) -> dict:
        raise NotImplementedError


class CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"

    def choice(self, deltas: list[Delta]) -> dict:
        return {
            "index": 0,
            "text": "".join(d.text for d in deltas),
            "logprobs": self.logprobs([t for d in deltas for t in d.tokens]),
            "finish_reason": deltas[-1].finish_reason if deltas else None,
        } | self.token_ids(deltas, first=True)

    def chunk(self, delta: Delta, first: bool) -> dict:
        choice = {
            "index": 0,
            "text": delta.text,
            "logprobs": self.logprobs(delta.tokens),
            "finish_reason": delta.finish_reason,
        } | self.token_ids([delta], first)
        return self.envelope(self.object_chunk, [choice])

    def logprobs(self, tokens: list[TokenEvent]) -> dict | None:
        if self.body.logprobs is None:
            return None
        texts = [self.token_text(t.token_id) for t in tokens]
        offsets = [sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [self.top(t) for t in tokens],
            "text_offset": offsets,
        }

    def top(self, token: TokenEvent) -> dict[str, float]:
        """Keyed by text as OpenAI does; ids that decode alike (partial UTF-8) keep the likeliest's logprob."""
        top: dict[str, float] = {}
        for token_id, logprob in (token.top_logprobs or {}).items():  # most likely first
            top.setdefault(self.token_text(token_id), logprob)
        return top


class ChatFormat(_Format):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def choice(self, deltas: list[Delta]) -> dict:
        message = {"role": "assistant", "content": "".join(d.text for d in deltas)}
        return {
            "index": 0,
            "message": message,
            "logprobs": self.logprobs([t for d in deltas for t in d.tokens]),
            "finish_reason": deltas[-1].finish_reason if deltas else None,
        } | self.token_ids(deltas, first=False)

    def full(self, deltas: list[Delta], completion_tokens: int) -> dict:
        body = super().full(deltas, completion_tokens)
        # vLLM puts a chat response's prompt ids beside its choices
        return body | ({"prompt_token_ids": self.prompt_ids} if self.body.return_token_ids else {})

    def chunk(self, delta: Delta, first: bool) -> dict:
        content = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
        choice = {
            "index": 0,
            "delta": content,
            "logprobs": self.logprobs(delta.tokens),
            "finish_reason": delta.finish_reason,
        } | self.token_ids([delta], first)
        return self.envelope(self.object_chunk, [choice])

    def logprobs(self, tokens: list[TokenEvent]) -> dict | None:
        if not self.body.logprobs:
            return None
        content = []
        for t in tokens:
            top = [self.entry(i, lp) for i, lp in (t.top_logprobs or {}).items()]
            content.append(self.entry(t.token_id, t.logprob) | {"top_logprobs": top})
        return {"content": content}

    def entry(self, token_id: int, logprob: float | None) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
