"""What the agent, the router, the demo and the benchmarks rely on from vLLM's OpenAI
server, asserted identically against gpufleet-vllm-sim and real vLLM (``server`` fixture).

Where the two differ on purpose, docs/simulator.md ("Differences from real vLLM") says so;
nothing here is skipped for one of them.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time

import pytest
import requests

from support.procs import wait_until

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Tell me about GPUs."}]
GREEDY = {"temperature": 0, "seed": 7}


def auth(server) -> dict:
    return {"Authorization": f"Bearer {server.api_key}"}


def post(server, path: str, body: dict | bytes, *, stream: bool = False, timeout: float = 60) -> requests.Response:
    kwargs = {"data": body, "headers": {**auth(server), "Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body, "headers": auth(server)}
    return requests.post(server.url + path, stream=stream, timeout=timeout, **kwargs)


def chat(server, **fields) -> dict:
    body = {"model": server.served_name, "messages": MESSAGES, **GREEDY, **fields}
    resp = post(server, CHAT, body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def text(server, **fields) -> dict:
    body = {"model": server.served_name, "prompt": "Once upon a time", **GREEDY, **fields}
    resp = post(server, TEXT, body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def events(resp: requests.Response) -> list[str]:
    """The SSE ``data:`` payloads in order; every event is ``data: …`` and a blank line."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = resp.content.decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


def stream(server, path: str, **fields) -> tuple[list[dict], list[str]]:
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": "Once upon a time"}
    resp = post(server, path, {"model": server.served_name, **prompt, **GREEDY, "stream": True, **fields},
                stream=True)
    payloads = events(resp)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]], payloads


def metrics(server) -> dict[tuple[str, tuple], float]:
    """vllm:* samples as {(name, sorted labels): value}, and the TYPE of each family."""
    samples, types = {}, {}
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("# TYPE vllm:"):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line.startswith("vllm:"):
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            pairs = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels)))
            samples[(name, pairs)] = float(value)
    return {"samples": samples, "types": types}


def gauge(server, name: str) -> float:
    return sum(v for (n, _), v in metrics(server)["samples"].items() if n == name)


# --- start-up and health ---------------------------------------------------------------

def test_port_closed_while_loading_then_health_200_with_an_empty_body(server):
    assert server.loading_answers == {"refused"}, "the port must stay closed while the model loads"
    resp = requests.get(server.url + "/health", timeout=5)
    assert resp.status_code == 200 and resp.content == b""


def test_auth_on_v1_only(server):
    assert requests.get(server.url + "/v1/models", timeout=5).status_code == 401
    bad = requests.post(server.url + CHAT, json={"messages": MESSAGES},
                        headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert bad.status_code == 401 and "error" in bad.json()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert requests.get(server.url + "/metrics", timeout=5).status_code == 200


def test_models_lists_the_served_name_with_max_model_len(server):
    body = requests.get(server.url + "/v1/models", headers=auth(server), timeout=5).json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert model["id"] == server.served_name and model["object"] == "model"
    assert model["owned_by"] == "vllm" and isinstance(model["root"], str) and isinstance(model["created"], int)
    assert model["max_model_len"] == server.max_model_len


# --- completions, not streamed -----------------------------------------------------------

def test_chat_completion_shape_usage_and_max_tokens(server):
    body = chat(server, max_tokens=7)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]+", body["id"]) and body["object"] == "chat.completion"
    assert body["model"] == server.served_name and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert usage["completion_tokens"] == 7 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7


def test_text_completion_shape_usage_and_max_tokens(server):
    body = text(server, max_tokens=5)
    assert re.fullmatch(r"cmpl-[0-9a-f]+", body["id"]) and body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_text_completion_defaults_to_16_tokens(server):
    assert text(server)["usage"]["completion_tokens"] == 16


def test_model_field_may_be_left_out(server):
    resp = post(server, TEXT, {"prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["model"] == server.served_name


def test_request_id_header_names_the_completion(server):
    resp = requests.post(server.url + TEXT, json={"model": server.served_name, "prompt": "Hi", "max_tokens": 1},
                         headers={**auth(server), "X-Request-Id": "conformance42"}, timeout=30)
    assert resp.json()["id"] == "cmpl-conformance42"


# --- streaming ----------------------------------------------------------------------------

def test_chat_stream_role_first_then_deltas_then_finish_and_the_same_text(server):
    whole = chat(server, max_tokens=12)["choices"][0]["message"]["content"]
    chunks, _ = stream(server, CHAT, max_tokens=12)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]+", chunks[0]["id"]) and chunks[0]["model"] == server.served_name
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in chunks)
    finishes = [c["choices"][0].get("finish_reason") for c in chunks]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    assert all(not c.get("usage") for c in chunks)  # no usage without stream_options.include_usage


def test_chat_stream_include_usage_adds_a_last_chunk_without_choices(server):
    chunks, _ = stream(server, CHAT, max_tokens=6, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last["choices"] == [] and last["id"] == chunks[0]["id"]
    assert last["usage"]["completion_tokens"] == 6
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(not c.get("usage") for c in chunks[:-1])


def test_text_stream_texts_then_finish_and_usage(server):
    whole = text(server, max_tokens=9)["choices"][0]["text"]
    chunks, _ = stream(server, TEXT, max_tokens=9, stream_options={"include_usage": True})
    body, last = chunks[:-1], chunks[-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert re.fullmatch(r"cmpl-[0-9a-f]+", chunks[0]["id"])
    assert "".join(c["choices"][0]["text"] for c in body) == whole
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert not any(c["choices"][0]["finish_reason"] for c in body[:-1])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 9


def _stop_string(generated: str) -> tuple[str, str]:
    """A 2-character alphanumeric piece of ``generated`` (first seen after a few characters),
    and the text before it."""
    for start in range(3, len(generated) - 2):
        piece = generated[start:start + 2]
        if piece.isascii() and piece.isalnum() and generated.find(piece) == start:
            return piece, generated[:start]
    raise AssertionError(f"no usable stop string in {generated!r}")


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_stop_string_ends_the_answer_before_it_streamed_or_not(server, path):
    def content(body):
        choice = body["choices"][0]
        return choice["message"]["content"] if path == CHAT else choice["text"]

    generate = chat if path == CHAT else text
    stop, before = _stop_string(content(generate(server, max_tokens=40)))
    body = generate(server, max_tokens=40, stop=[stop])
    assert content(body) == before
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] == stop

    chunks, _ = stream(server, path, max_tokens=40, stop=stop)
    key = "delta" if path == CHAT else None
    pieces = [(c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == before
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["stop_reason"] == stop


# --- errors ---------------------------------------------------------------------------------

def assert_error(resp: requests.Response, status: int, *, param=..., type_=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    if param is not ...:
        assert error["param"] == param, error
    if type_:
        assert error["type"] == type_, error
    return error


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_unknown_model_is_404_not_found_with_param_model(server, path):
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": "Hi"}
    error = assert_error(post(server, path, {"model": "no-such-model", **prompt}), 404,
                         param="model", type_="NotFoundError")
    assert error["code"] == 404 and "no-such-model" in error["message"]


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_malformed_json_is_400(server, path):
    assert_error(post(server, path, b'{"model": '), 400)


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_max_tokens_over_max_model_len_is_400(server, path):
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": "Hi"}
    error = assert_error(post(server, path, {"model": server.served_name, **prompt,
                                             "max_tokens": server.max_model_len + 1}), 400,
                         param="max_tokens", type_="BadRequestError")
    assert str(server.max_model_len) in error["message"]


def test_max_tokens_beyond_the_room_left_is_cut_to_fit(server):
    """prompt + max_tokens over the context, max_tokens alone within it: answered, cut to fit."""
    body = text(server, prompt=[5] * (server.max_model_len - 6), max_tokens=20, ignore_eos=True)
    assert body["usage"] == {**body["usage"], "prompt_tokens": server.max_model_len - 6, "completion_tokens": 6,
                             "total_tokens": server.max_model_len}
    assert body["choices"][0]["finish_reason"] == "length"


def test_prompt_longer_than_the_context_is_400(server):
    assert_error(post(server, TEXT, {"model": server.served_name, "prompt": [5] * (server.max_model_len + 1),
                                     "max_tokens": 1}), 400, type_="BadRequestError")


@pytest.mark.parametrize("fields, status", [
    ({"temperature": -1}, 404),          # a bad sampling value: the unknown model is reported first
    ({"max_tokens": 0}, 404),
    ({"max_tokens": 10**6}, 404),
    ({"messages": None}, 400),           # a missing required field: the request's shape comes first
    ({"max_tokens": "many"}, 400),       # so does a field of the wrong type
])
def test_which_error_comes_first(server, fields, status):
    body = {"model": "no-such-model", "messages": MESSAGES, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    assert_error(post(server, CHAT, body), status)


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_sampling_values_are_400_naming_the_field(server, fields, param):
    body = {"model": server.served_name, "messages": MESSAGES, **fields}
    assert_error(post(server, CHAT, body), 400, param=param, type_="BadRequestError")


# --- metrics -------------------------------------------------------------------------------

AGENT_READS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:request_success_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    "vllm:generation_tokens_total": "counter",
    "vllm:prefix_cache_queries_total": "counter",
    "vllm:prefix_cache_hits_total": "counter",
    "vllm:num_preemptions_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:prompt_tokens_cached_total": "counter",
    "vllm:iteration_tokens_total": "histogram",
}
# vLLM 0.32's buckets of tokens per engine step
ITERATION_TOKENS_BUCKETS = ["1.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "512.0", "1024.0", "2048.0",
                            "4096.0", "8192.0", "16384.0", "+Inf"]


def _family(name: str) -> str:
    """The TYPE line's name of a sample: counters are typed without _total in prometheus_client."""
    return re.sub(r"_(bucket|count|sum)$", "", name)


def test_metric_families_types_and_labels(server):
    text(server, max_tokens=3)
    found = metrics(server)
    types = {name + ("_total" if kind == "counter" and not name.endswith("_total") else ""): kind
             for name, kind in found["types"].items()}
    for name, kind in AGENT_READS.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    for (name, labels), _ in found["samples"].items():
        if _family(name) in AGENT_READS or name in AGENT_READS:
            keys = dict(labels)
            assert keys.get("model_name") == server.served_name and keys.get("engine") == "0", (name, labels)
    reasons = {dict(labels).get("finished_reason") for (name, labels) in found["samples"]
               if name == "vllm:request_success_total"}
    assert {"stop", "length", "abort"} <= reasons
    ttft_count = [v for (n, _), v in found["samples"].items() if n == "vllm:time_to_first_token_seconds_count"]
    buckets = [dict(lab)["le"] for (n, lab) in found["samples"] if n == "vllm:time_to_first_token_seconds_bucket"]
    assert ttft_count and ttft_count[0] >= 1 and "+Inf" in buckets
    steps = [dict(lab)["le"] for (n, lab) in found["samples"] if n == "vllm:iteration_tokens_total_bucket"]
    assert steps == ITERATION_TOKENS_BUCKETS


def cache_config(server) -> dict:
    found = metrics(server)
    assert found["types"].get("vllm:cache_config_info") == "gauge"
    (labels, value), = [(dict(lab), v) for (n, lab), v in found["samples"].items() if n == "vllm:cache_config_info"]
    assert value == 1
    return labels


def test_cache_config_info_names_the_block_size_and_the_number_of_blocks(server):
    """(vLLM's CPU backend uses blocks of 128 tokens, GPUs 16, the simulator's default.)"""
    labels = cache_config(server)
    assert labels["engine"] == "0" and labels["enable_prefix_caching"] == "True"
    assert int(labels["block_size"]) in (16, 128) and int(labels["num_gpu_blocks"]) > 0


def test_a_repeated_prompt_hits_the_prefix_cache_in_tokens(server):
    """The second request with the same long prompt reuses its full cached blocks: hits are
    counted in tokens (whole blocks, all but the last token's), and as many prompt tokens
    are counted as cached."""
    block_size = int(cache_config(server)["block_size"])
    prompt = "Prefix caching test number seven. " + "The quick brown fox jumps over the lazy dog. " * 30
    text(server, prompt=prompt, max_tokens=2)
    before = metrics(server)["samples"]
    body = text(server, prompt=prompt, max_tokens=2)
    after = metrics(server)["samples"]

    def delta(name):
        return sum(v for (n, _), v in after.items() if n == name) - sum(v for (n, _), v in before.items() if n == name)

    prompt_tokens = body["usage"]["prompt_tokens"]
    hits = delta("vllm:prefix_cache_hits_total")
    assert delta("vllm:prefix_cache_queries_total") == prompt_tokens
    assert hits % block_size == 0 and prompt_tokens - block_size <= hits < prompt_tokens, (hits, prompt_tokens)
    assert delta("vllm:prompt_tokens_cached_total") == hits
    assert delta("vllm:num_preemptions_total") == 0


class LongStreams:
    """``n`` long streamed completions held open by client threads until ``close()``."""

    def __init__(self, server, n: int):
        self.socks: list[socket.socket] = []
        body = json.dumps({"model": server.served_name, "prompt": "Count to ten thousand:", "stream": True,
                           "max_tokens": server.max_model_len - 100, "ignore_eos": True}).encode()
        head = (f"POST {TEXT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(head + body)
            self.socks.append(sock)
        self._stop = threading.Event()
        self._readers = [threading.Thread(target=self._drain, args=(s,), daemon=True) for s in self.socks]
        for reader in self._readers:
            reader.start()

    def _drain(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set() and sock.recv(65536):
                pass

    def close(self) -> None:
        self._stop.set()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_running_and_waiting_follow_max_num_seqs_and_a_disconnect_aborts(server):
    """max-num-seqs + 2 long streams: max-num-seqs run, 2 wait; closing the connections aborts
    them all (waiting ones too) and the engine stops generating at once. (How an abort is
    counted differs: docs/simulator.md, "Differences from real vLLM".)"""
    n = server.max_num_seqs + 2
    streams = LongStreams(server, n)
    try:
        wait_until(lambda: (gauge(server, "vllm:num_requests_running"), gauge(server, "vllm:num_requests_waiting"))
                   == (server.max_num_seqs, 2), timeout=30, interval=0.1,
                   what=f"{server.max_num_seqs} running and 2 waiting")
        assert gauge(server, "vllm:kv_cache_usage_perc") > 0
    finally:
        streams.close()
    closed = time.monotonic()
    wait_until(lambda: gauge(server, "vllm:num_requests_running") + gauge(server, "vllm:num_requests_waiting") == 0,
               timeout=10, interval=0.05, what="the engine to drop the disconnected requests")
    assert time.monotonic() - closed < 5, "aborted only when the requests would have ended anyway"
    generated = gauge(server, "vllm:generation_tokens_total")
    time.sleep(1)
    assert gauge(server, "vllm:generation_tokens_total") == generated, "still generating for nobody"
    assert gauge(server, "vllm:kv_cache_usage_perc") == 0


# --- connections ---------------------------------------------------------------------------

def test_idle_keep_alive_connection_closed_after_5_s(server):
    host, port = "127.0.0.1", server.port
    with contextlib.closing(socket.create_connection((host, port), timeout=5)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        sock.settimeout(3.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)                    # still open after 3.5 s idle
        sock.settimeout(6)
        assert sock.recv(1) == b""          # closed by the server before 9.5 s
