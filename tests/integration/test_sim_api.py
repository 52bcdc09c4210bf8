"""gpufleet-vllm-sim as a real process: the OpenAI client, vLLM's shapes, errors, auth,
determinism and start-up."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import openai
import pytest
import requests

from support.procs import wait_http, wait_until

KEY = "sk-sim-test"


def start_sim(daemons, *args: str, wait: bool = True):
    port = daemons.port()
    proc = daemons.start("vllm-sim", [daemons.script("gpufleet-vllm-sim"), "org/tiny-model", "--port", str(port),
                                      *args])
    base = f"http://127.0.0.1:{port}"
    if wait:
        wait_http(base + "/health", proc=proc, timeout=30)
    return base, proc


@pytest.fixture
def sim(daemons):
    base, _ = start_sim(daemons, "--served-model-name", "tiny", "--api-key", KEY, "--ttft-ms", "5",
                        "--itl-ms", "1", "--jitter", "0")
    return base


@pytest.fixture
def client(sim):
    with openai.OpenAI(base_url=sim + "/v1", api_key=KEY, max_retries=0, timeout=20) as c:
        yield c


AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Tell me about GPUs."}]


def test_openai_client_chat_and_text_completions(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=7)
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion" and chat.model == "tiny"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 7
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 7 and chat.usage.prompt_tokens > 0

    text = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5)
    assert text.id.startswith("cmpl-") and text.object == "text_completion"
    assert text.choices[0].text and text.choices[0].finish_reason == "length"
    assert text.usage.completion_tokens == 5

    assert [m.id for m in client.models.list()] == ["tiny"]


def test_openai_client_streams_the_same_text(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, seed=3)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, seed=3,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    text_whole = client.completions.create(model="tiny", prompt="abc", max_tokens=6)
    text_chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in text_chunks) == text_whole.choices[0].text
    assert len(text_chunks) == 6 and text_chunks[-1].choices[0].finish_reason == "length"


def sse_events(resp: requests.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines(decode_unicode=True) if line]


def test_raw_sse_stream_has_vllm_shape(sim):
    resp = requests.post(sim + "/v1/chat/completions", headers=AUTH, stream=True, timeout=20, json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks[:-1])
    assert chunks[0]["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}
    tokens = chunks[1:-1]
    assert len(tokens) == 4
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in tokens)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_metrics_have_vllm_names_and_the_served_model_label(sim, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=3)
    text = requests.get(sim + "/metrics", timeout=10).text
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 1.0' in text
    assert 'vllm:generation_tokens_total{engine="0",model_name="tiny"} 3.0' in text
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"}' in text
    assert "\nprocess_start_time_seconds " in text


def test_request_id_header_names_the_completion(sim):
    resp = requests.post(sim + "/v1/chat/completions", headers={**AUTH, "X-Request-Id": "trace-42"}, timeout=10,
                         json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
    assert resp.json()["id"] == "chatcmpl-trace-42"


def test_stop_strings_end_with_stop(client):
    full = client.completions.create(model="tiny", prompt="stop test", max_tokens=12).choices[0].text
    word = full.split()[4]
    cut = client.completions.create(model="tiny", prompt="stop test", max_tokens=12, stop=["zzz", word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[:full.index(word)]


def test_models_shape(sim):
    body = requests.get(sim + "/v1/models", headers=AUTH, timeout=10).json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert {"id": "tiny", "object": "model", "owned_by": "vllm", "root": "org/tiny-model", "parent": None,
            "max_model_len": 4096}.items() <= model.items()
    assert isinstance(model["created"], int)


def test_auth_on_v1_only(sim, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = requests.post(sim + "/v1/completions", json={"prompt": "x"}, headers=headers, timeout=10)
        assert resp.status_code == 401, headers
        assert resp.json() == {"error": "Unauthorized"}  # vLLM's body
    assert requests.get(sim + "/v1/models", timeout=10).status_code == 401
    assert requests.get(sim + "/health", timeout=10).status_code == 200
    assert requests.get(sim + "/metrics", timeout=10).status_code == 200
    with openai.OpenAI(base_url=sim + "/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES}, 404, "model"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
])
def test_bad_input_gets_openai_errors(sim, path, body, status, param):
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = requests.post(sim + path, headers=AUTH, timeout=10, **kwargs)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_openai_client_maps_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100000)


def test_deterministic_text_per_prompt_and_seed(daemons):
    a, _ = start_sim(daemons, "--seed", "1", "--ttft-ms", "0", "--itl-ms", "0")
    b, _ = start_sim(daemons, "--seed", "2", "--ttft-ms", "0", "--itl-ms", "0")

    def text(base, **extra):
        body = {"messages": MESSAGES, "max_tokens": 12, **extra}
        resp = requests.post(base + "/v1/chat/completions", json=body, timeout=10)
        return resp.json()["choices"][0]["message"]["content"]

    assert text(a) == text(a)
    assert text(a) != text(b)                                  # --seed changes the text
    assert text(a, seed=42) == text(b, seed=42)                # the request's seed wins
    assert text(a, seed=42) != text(a, seed=43)
    assert text(a, messages=[{"role": "user", "content": "other"}]) != text(a)


def test_port_closed_while_loading_then_200_as_vllm(daemons):
    base, proc = start_sim(daemons, "--startup-delay", "2", wait=False)
    launched = time.monotonic()
    answers = set()

    def healthy():
        assert proc.alive(), proc.output()
        try:
            status = requests.get(base + "/health", timeout=2).status_code
        except requests.ConnectionError:
            answers.add("refused")
            return False
        answers.add(status)
        return status == 200

    wait_until(healthy, timeout=30, interval=0.05, what="the simulator to load")
    assert answers == {"refused", 200}
    assert time.monotonic() - launched >= 2
    assert requests.post(base + "/v1/completions", json={"prompt": "x"}, timeout=5).status_code == 200


def test_listen_while_loading_answers_503_then_200(daemons):
    base, proc = start_sim(daemons, "--startup-delay", "2", "--listen-while-loading", wait=False)

    def first_answer():
        assert proc.alive(), proc.output()
        return [requests.get(base + "/health", timeout=2)]  # a list: a 503 Response is falsy

    (first,) = wait_until(first_answer, timeout=30, what="the simulator to listen")
    started_at = time.monotonic()
    assert first.status_code == 503 and "loading" in first.json()["error"]["message"]
    assert requests.get(base + "/v1/models", timeout=5).status_code == 503
    assert requests.post(base + "/v1/completions", json={"prompt": "x"}, timeout=5).status_code == 503
    ok = wait_http(base + "/health", proc=proc, status=200, timeout=30)
    assert ok.text == ""
    assert time.monotonic() - started_at > 0.5
    assert requests.post(base + "/v1/completions", json={"prompt": "x"}, timeout=5).status_code == 200


def _idle_keep_alive_connection(base: str) -> socket.socket:
    """A connection that has had one answered keep-alive request and now sits idle."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
    return sock


def test_idle_keep_alive_connection_is_closed_after_5_s_by_default(daemons):
    """As vLLM (uvicorn's timeout_keep_alive): a client or router that reuses a connection
    idle for longer than that meets a closed socket, so the simulator must not hide it."""
    base, _ = start_sim(daemons)
    with contextlib.closing(_idle_keep_alive_connection(base)) as sock:
        sock.settimeout(3.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)                           # still open after 3.5 s idle
        sock.settimeout(6)
        assert sock.recv(1) == b""                 # closed by the server before 9.5 s


def test_keep_alive_timeout_flag(daemons):
    base, _ = start_sim(daemons, "--keep-alive-timeout", "0.5")
    with contextlib.closing(_idle_keep_alive_connection(base)) as sock:
        started = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 4


def test_render_answers_the_prompt_token_ids_as_vllm(sim):
    """POST /v1/chat/completions/render (vLLM 0.32; vllm-router's cache_aware asks every
    worker for it): the templated prompt's token ids, as many as the completion's
    prompt_tokens, the same for the same text, a shared prefix giving the same leading ids;
    behind the API key like every /v1 path."""
    system = {"role": "system", "content": "You are a terse assistant for the fleet. " * 20}
    body = {"model": "tiny", "messages": [system, {"role": "user", "content": "Hi there"}]}
    other = {"model": "tiny", "messages": [system, {"role": "user", "content": "Something else entirely"}]}
    url = sim + "/v1/chat/completions/render"
    assert requests.post(url, json=body, timeout=10).status_code == 401

    def render(payload):
        resp = requests.post(url, json=payload, headers=AUTH, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()["token_ids"]

    ids = render(body)
    assert ids == render(body) and all(isinstance(i, int) and 0 <= i < 128_256 for i in ids)
    usage = requests.post(sim + "/v1/chat/completions", json={**body, "max_tokens": 1}, headers=AUTH,
                          timeout=10).json()["usage"]
    assert len(ids) == usage["prompt_tokens"]
    others = render(other)
    shared = next(i for i, (a, b) in enumerate(zip(ids, others, strict=False)) if a != b)
    assert shared > 100 and others != ids  # the system prompt (and the user turn's header) in common
    assert requests.post(url, json={"model": "nope", "messages": body["messages"]}, headers=AUTH,
                         timeout=10).status_code == 404
