"""OpenAI request validation and vLLM's response shapes (chat and text completions,
streamed or not). Pure functions of their inputs: no sockets, no clocks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gpufleet.common.openai_errors import error_body

from . import textgen

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# vLLM's error ``type`` per status (the name of the exception it maps to that status)
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class RequestError(Exception):
    """A request the server refuses; becomes vLLM's error body with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        # as vLLM's ErrorResponse: OpenAI's four fields, the status as ``code`` unless told otherwise
        return error_body(self.status, self.message, param=self.param,
                          code=self.code if self.code is not None else self.status,
                          type_=ERROR_TYPES.get(self.status))


@dataclass
class GenRequest:
    kind: str                     # "chat" or "completion"
    model: str
    prompt_key: str               # what the generated text is derived from
    prompt_tokens: int
    max_tokens: int
    # the prompt's tokens (after the chat template), for prefix caching; len == prompt_tokens
    tokens: list[str] = field(default_factory=list)
    stream: bool = False
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    include_usage: bool = False
    continuous_usage: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class Limits:
    served_names: tuple[str, ...]
    max_model_len: int
    # max_tokens when a request gives none; None: vLLM's (16 for text, the rest of the context for chat)
    default_max_tokens: int | None = None


TEXT_DEFAULT_MAX_TOKENS = 16


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param=param)


def _int_type(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(f"{name} must be an integer, got {value!r}", name)
    return value


def _at_least(value: int | None, name: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise _bad(f"{name} must be at least {minimum}, got {value}.", name)


def _number_type(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _bad(f"{name} must be a number, got {value!r}", name)
    return value


def _common(body: dict, limits: Limits, kind: str, prompt_key: str, tokens: list[str],
            max_tokens: int | None, max_tokens_name: str = "max_tokens") -> GenRequest:
    """Validate in vLLM's order: the request's shape (types, as its pydantic models do), then
    the model (404), then the values (sampling parameters, lengths)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("stop must be a string or a list of strings", "stop")
    seed = _int_type(body, "seed")
    n = _int_type(body, "n")
    min_tokens = _int_type(body, "min_tokens")
    temperature = _number_type(body, "temperature")
    top_p = _number_type(body, "top_p")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be a boolean", "ignore_eos")

    if model is None:
        model = limits.served_names[0]
    elif model not in limits.served_names:
        raise RequestError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(limits.served_names)}.",
                           param="model")

    if stream_options is not None and not stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    stream_options = stream_options or {}
    _at_least(n, "n", 1)
    if n is not None and n > 1:
        raise _bad("n > 1 is not supported by gpufleet-vllm-sim", "n")
    if temperature is not None and temperature < 0:
        raise _bad(f"temperature must be non-negative, got {temperature}.", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    _at_least(max_tokens, max_tokens_name, 1)
    _at_least(min_tokens, "min_tokens", 0)

    prompt_tokens = len(tokens)
    room = limits.max_model_len - prompt_tokens
    if max_tokens is not None and max_tokens > limits.max_model_len:
        raise _bad(f"max_tokens={max_tokens} cannot be greater than max_model_len={limits.max_model_len}. "
                   "Please request fewer output tokens.", "max_tokens")
    if room < 1:
        raise _bad(f"This model's maximum context length is {limits.max_model_len} tokens. However, your prompt "
                   f"contains at least {prompt_tokens} input tokens, which exceeds this limit even without any "
                   "output tokens. Please reduce the length of the input prompt.", "input_tokens")
    if max_tokens is None:
        max_tokens = limits.default_max_tokens or (TEXT_DEFAULT_MAX_TOKENS if kind == "completion" else room)
    max_tokens = min(max_tokens, room)  # as vLLM: cut to what the context leaves, not refused
    min_tokens = min_tokens or 0
    if min_tokens > max_tokens:
        raise _bad(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
                   "min_tokens")

    return GenRequest(kind=kind, model=model, prompt_key=prompt_key, prompt_tokens=prompt_tokens,
                      max_tokens=max_tokens, tokens=tokens, stream=stream, stops=stops, seed=seed,
                      include_usage=bool(stream_options.get("include_usage")),
                      continuous_usage=bool(stream_options.get("continuous_usage_stats")),
                      ignore_eos=ignore_eos, min_tokens=min_tokens)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def parse_chat(body: dict, limits: Limits) -> GenRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{index}] must be an object with a string role", "messages")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _bad(f"messages[{index}].content must be a string or a list of parts", "messages")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int_type(body, name)
    prompt_key = "\x1e".join(f"{m['role']}\x1f{textgen.content_text(m.get('content'))}" for m in messages)
    return _common(body, limits, "chat", prompt_key, textgen.chat_template_tokens(messages), max_tokens, name)


def parse_completion(body: dict, limits: Limits) -> GenRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        prompt_key, tokens = prompt, textgen.tokenize(prompt)
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        tokens = [str(t) for t in prompt]
        prompt_key = " ".join(tokens)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("batched prompts are not supported by gpufleet-vllm-sim: send one prompt per request",
                   "prompt")
    else:
        raise _bad("prompt must be a string or a list of token ids", "prompt")
    if not tokens:
        tokens = ["<s>"]  # an empty prompt is still one token (the BOS), as with a real tokenizer
    return _common(body, limits, "completion", prompt_key, tokens, _int_type(body, "max_tokens"))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def completion_response(req: GenRequest, request_id: str, created: int, text: str, finish_reason: str,
                        stop_reason: str | None, completion_tokens: int) -> bytes:
    used = usage(req.prompt_tokens, completion_tokens)
    used["prompt_tokens_details"] = None
    if req.kind == "chat":
        body = {
            "id": request_id, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "reasoning_content": None, "content": text, "tool_calls": []},
                "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason,
            }],
            "service_tier": None, "system_fingerprint": None, "usage": used,
            "prompt_logprobs": None, "kv_transfer_params": None,
        }
    else:
        body = {
            "id": request_id, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{
                "index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                "stop_reason": stop_reason, "prompt_logprobs": None,
            }],
            "service_tier": None, "system_fingerprint": None, "usage": used, "kv_transfer_params": None,
        }
    return _dumps(body).encode()


class ChunkEncoder:
    """SSE events of one stream, byte for byte as vLLM writes them (``exclude_unset``
    JSON: fields that vLLM leaves unset are absent, not null)."""

    def __init__(self, req: GenRequest, request_id: str, created: int):
        self.req = req
        self.chat = req.kind == "chat"
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        self._head = (f'data: {{"id":{_dumps(request_id)},"object":"{obj}","created":{created},'
                      f'"model":{_dumps(req.model)},')

    def role(self) -> bytes:
        """The chat stream's first event: the assistant role with empty content."""
        return (self._head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                '"logprobs":null,"finish_reason":null}]}\n\n').encode()

    def token(self, text: str, finish_reason: str | None = None, stop_reason: str | None = None,
              usage_so_far: dict | None = None) -> bytes:
        if self.chat:
            choice = f'{{"index":0,"delta":{{"content":{_dumps(text)}}},"logprobs":null,'
        else:
            choice = f'{{"index":0,"text":{_dumps(text)},"logprobs":null,'
        if finish_reason is None:
            choice += '"finish_reason":null' + ("}" if self.chat else ',"stop_reason":null}')
        else:
            choice += f'"finish_reason":"{finish_reason}","stop_reason":{_dumps(stop_reason)}}}'
        tail = "" if usage_so_far is None else f',"usage":{_dumps(usage_so_far)}'
        return (self._head + '"choices":[' + choice + "]" + tail + "}\n\n").encode()

    def usage(self, completion_tokens: int) -> bytes:
        used = usage(self.req.prompt_tokens, completion_tokens)
        return (self._head + f'"choices":[],"usage":{_dumps(used)}}}\n\n').encode()

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"

    @staticmethod
    def error(err: RequestError) -> bytes:
        return f"data: {_dumps(err.body())}\n\n".encode()
