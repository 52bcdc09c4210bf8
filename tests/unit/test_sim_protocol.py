"""Request validation and vLLM's response shapes, without sockets."""

import json

import pytest

from gpufleet.sim.protocol import (
    ChunkEncoder,
    Limits,
    RequestError,
    completion_response,
    parse_body,
    parse_chat,
    parse_completion,
)

LIMITS = Limits(("opt", "opt-alias"), 128, 16)
CHAT = {"model": "opt", "messages": [{"role": "user", "content": "hi"}]}


def err(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value


def test_parse_body_rejects_malformed_json_and_non_objects():
    assert err(parse_body, b"{nope").status == 400
    assert err(parse_body, b"[1]").status == 400
    assert parse_body(b'{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("change, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),   # without stream=true
    ({"n": 2}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"seed": "x"}, "seed"),
    ({"model": 3}, "model"),
    ({"max_tokens": 200}, "max_tokens"),                                # beyond max_model_len
])
def test_chat_bad_fields_are_400_naming_the_field(change, param):
    e = err(parse_chat, {**CHAT, **change}, LIMITS)
    assert e.status == 400 and e.param == param
    body = e.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "BadRequestError" and body["error"]["code"] == 400  # as vLLM


def test_unknown_model_is_404():
    e = err(parse_chat, {**CHAT, "model": "gpt-9"}, LIMITS)
    assert e.status == 404 and "gpt-9" in e.message
    assert e.body()["error"] == {"message": e.message, "type": "NotFoundError", "param": "model", "code": 404}


@pytest.mark.parametrize("change, status", [
    ({"temperature": -1}, 404),     # values are checked after the model, as vLLM does
    ({"max_tokens": 0}, 404),
    ({"max_tokens": 10**6}, 404),
    ({"n": 3}, 404),
    ({"max_tokens": "5"}, 400),     # the shape (types, required fields) before it
    ({"messages": "hi"}, 400),
])
def test_unknown_model_and_a_bad_field_which_comes_first(change, status):
    assert err(parse_chat, {**CHAT, "model": "gpt-9", **change}, LIMITS).status == status


def test_max_tokens_cut_to_the_room_left_as_vllm():
    long_prompt = {"model": "opt", "prompt": list(range(100))}
    assert parse_completion({**long_prompt, "max_tokens": 50}, LIMITS).max_tokens == 28   # 128 - 100
    assert parse_completion({**long_prompt, "max_tokens": 5}, LIMITS).max_tokens == 5
    e = err(parse_completion, {**long_prompt, "max_tokens": 129}, LIMITS)
    assert e.status == 400 and e.param == "max_tokens" and "max_model_len=128" in e.message
    e = err(parse_completion, {"model": "opt", "prompt": list(range(128))}, LIMITS)
    assert e.status == 400 and e.param == "input_tokens"


def test_default_max_tokens_as_vllm():
    vllm_defaults = Limits(("opt",), 128)
    assert parse_completion({"prompt": [1, 2, 3]}, vllm_defaults).max_tokens == 16
    chat = parse_chat(CHAT, vllm_defaults)
    assert chat.max_tokens == 128 - chat.prompt_tokens  # chat: the rest of the context


def test_chat_defaults_and_aliases():
    req = parse_chat({"messages": CHAT["messages"]}, LIMITS)
    assert req.model == "opt" and req.max_tokens == 16 and not req.stream
    req = parse_chat({**CHAT, "model": "opt-alias", "max_tokens": 50, "max_completion_tokens": 7,
                      "stop": "x", "stream": True, "stream_options": {"include_usage": True}}, LIMITS)
    assert (req.model, req.max_tokens, req.stops, req.include_usage) == ("opt-alias", 7, ["x"], True)


def test_completion_prompts():
    assert parse_completion({"model": "opt", "prompt": "hello world"}, LIMITS).prompt_tokens == 2
    assert parse_completion({"model": "opt", "prompt": [1, 2, 3]}, LIMITS).prompt_tokens == 3
    assert parse_completion({"model": "opt", "prompt": ["hello"]}, LIMITS).prompt_key == "hello"
    assert err(parse_completion, {"model": "opt"}, LIMITS).status == 400
    assert err(parse_completion, {"model": "opt", "prompt": ["a", "b"]}, LIMITS).param == "prompt"


def test_non_streamed_shapes():
    chat = parse_chat(CHAT, LIMITS)
    body = json.loads(completion_response(chat, "chatcmpl-1", 123, "Hi.", "length", None, 2))
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == "Hi."
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"]["total_tokens"] == chat.prompt_tokens + 2
    text = parse_completion({"prompt": "x"}, LIMITS)
    body = json.loads(completion_response(text, "cmpl-1", 123, "abc", "stop", "\n", 3))
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "abc"
    assert body["choices"][0]["stop_reason"] == "\n"


def sse(data: bytes) -> dict:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data[6:])


def test_chunks_match_vllm_exclude_unset_shapes():
    chat = parse_chat({**CHAT, "stream": True}, LIMITS)
    enc = ChunkEncoder(chat, "chatcmpl-9", 5)
    assert sse(enc.role())["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]
    mid = sse(enc.token(' "quoted"'))
    assert mid["object"] == "chat.completion.chunk" and mid["model"] == "opt" and mid["created"] == 5
    assert mid["choices"][0]["delta"] == {"content": ' "quoted"'} and "usage" not in mid
    last = sse(enc.token("x", "stop", "END"))
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["stop_reason"] == "END"
    assert sse(enc.usage(4)) == {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5,
                                 "model": "opt", "choices": [],
                                 "usage": {"prompt_tokens": chat.prompt_tokens,
                                           "total_tokens": chat.prompt_tokens + 4, "completion_tokens": 4}}
    assert enc.done() == b"data: [DONE]\n\n"
    text = ChunkEncoder(parse_completion({"prompt": "x", "stream": True}, LIMITS), "cmpl-9", 5)
    assert sse(text.token("a"))["choices"] == [{"index": 0, "text": "a", "logprobs": None,
                                                "finish_reason": None, "stop_reason": None}]
