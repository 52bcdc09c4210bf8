"""The simulator's aiohttp application: vLLM's HTTP surface over the simulated engine."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import random
import socket
import struct
import time

from aiohttp import web

from . import VLLM_COMPAT_VERSION, textgen
from .engine import Engine
from .faults import RESET_STREAM_AFTER_CHUNKS, FaultConfig, FaultInjector, validate_update
from .latency import SLOW_FACTOR, StepCost
from .metrics import CONTENT_TYPE, SimMetrics
from .options import SimOptions
from .protocol import ChunkEncoder, Limits, RequestError, completion_response, parse_body, parse_chat, parse_completion

log = logging.getLogger("gpufleet.sim")

JSON = "application/json"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
# The ``slow`` fault on /health, /v1/models and /metrics delays the answer this long at least.
SLOW_PROBE_MIN_S = 0.5


class SimState:
    def __init__(self, options: SimOptions):
        self.options = options
        self.names = options.served_names
        self.limits = Limits(self.names, options.max_model_len, options.default_max_tokens)
        cost = StepCost(step_s=options.step_ms / 1000, step_s_per_token=options.step_ms_per_token / 1000,
                        ttft_s=options.ttft_ms / 1000, jitter=options.jitter,
                        slowdown_per_seq=options.slowdown_per_seq, time_scale=options.time_scale)
        self.engine = Engine(
            cost=cost, max_num_seqs=options.max_num_seqs, kv_cache_tokens=options.kv_cache_tokens,
            max_num_batched_tokens=options.max_num_batched_tokens, block_size=options.block_size,
            enable_prefix_caching=options.enable_prefix_caching, stream_interval=options.stream_interval,
            seed=options.seed, natural_range=options.output_len_range,
            metrics_factory=lambda **gauges: SimMetrics(self.names[0], options.max_model_len, **gauges))
        mode = options.fault_mode if options.fault_rate > 0 else "none"
        self.faults = FaultInjector(FaultConfig(mode, options.fault_rate, options.fault_scope),
                                    random.Random(options.seed ^ 0x5EED))
        self._api_key = options.api_key.encode() if options.api_key else None
        self.started = time.monotonic()

    @property
    def loading(self) -> bool:
        return time.monotonic() - self.started < self.options.startup_delay

    def unauthorized(self, request: web.Request) -> bool:
        if self._api_key is None:
            return False
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key))


STATE = web.AppKey("sim_state", SimState)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    return _error_from(RequestError(status, message, param=param, code=code))


def _error_from(err: RequestError) -> web.Response:
    return web.Response(status=err.status, body=json.dumps(err.body()).encode(), content_type=JSON)


def _unauthorized() -> web.Response:
    return web.json_response({"error": "Unauthorized"}, status=401)  # vLLM's body, word for word


def _loading() -> web.Response:
    return _error(503, "loading the model: the server is starting", code="model_loading")


def _refusal(state, request: web.Request) -> web.Response | None:
    """What a completion-like endpoint answers before reading the body: 401 without the
    API key, 503 while the model loads; None when the request may go on."""
    if state.unauthorized(request):
        return _unauthorized()
    if state.loading:
        return _loading()
    return None


def _reset_connection(request: web.Request) -> None:
    """Close the TCP connection with a RST, without an answer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _never_answer(request: web.Request) -> web.StreamResponse:
    """Hold the request until the client gives up (the handler is then cancelled)."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")  # pragma: no cover


async def _reset(request: web.Request) -> web.StreamResponse:
    _reset_connection(request)
    await _never_answer(request)  # the lost connection cancels this handler
    raise AssertionError("unreachable")  # pragma: no cover


async def _probe_fault(request: web.Request, state: SimState) -> web.StreamResponse | None:
    """The ``all``-scope fault of /health, /v1/models and /metrics, or None."""
    fault = state.faults.pick(completion=False)
    if fault == "error":
        return _error(500, "simulated fault: internal server error", code="simulated_fault")
    if fault == "hang":
        return await _never_answer(request)
    if fault == "reset":
        return await _reset(request)
    if fault == "slow":
        await asyncio.sleep(max(state.options.ttft_ms / 1000 * SLOW_FACTOR, SLOW_PROBE_MIN_S)
                            * state.options.time_scale)
    return None


async def health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    failed = await _probe_fault(request, state)
    if failed is not None:
        return failed
    if state.loading:
        return _loading()
    return web.Response(status=200)


async def version(request: web.Request) -> web.StreamResponse:
    return web.json_response({"version": VLLM_COMPAT_VERSION})


async def models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.unauthorized(request):
        return _unauthorized()
    failed = await _probe_fault(request, state)
    if failed is not None:
        return failed
    if state.loading:
        return _loading()
    created = int(time.time())
    data = [{
        "id": name, "object": "model", "created": created, "owned_by": "vllm",
        "root": state.options.model, "parent": None, "max_model_len": state.options.max_model_len,
        "permission": [{
            "id": f"modelperm-{os.urandom(8).hex()}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    } for name in state.names]
    return web.json_response({"object": "list", "data": data})


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    failed = await _probe_fault(request, state)
    if failed is not None:
        return failed
    return web.Response(body=state.engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def render_chat(request: web.Request) -> web.StreamResponse:
    """vLLM 0.32's ``POST /v1/chat/completions/render``: the prompt after the chat template as
    token ids, nothing generated. vllm-router's ``cache_aware`` asks every worker for it and
    matches prefixes on the ids; without it that policy does not route by prefix at all."""
    state = request.app[STATE]
    refused = _refusal(state, request)
    if refused is not None:
        return refused
    try:
        req = parse_chat(parse_body(await request.read()), state.limits)
    except RequestError as err:
        return _error_from(err)
    return web.json_response({"request_id": os.urandom(16).hex(), "token_ids": textgen.token_ids(req.tokens)})


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    arrival = time.monotonic()
    state = request.app[STATE]
    refused = _refusal(state, request)
    if refused is not None:
        return refused
    try:
        body = parse_body(await request.read())
        req = parse_chat(body, state.limits) if kind == "chat" else parse_completion(body, state.limits)
    except RequestError as err:
        return _error_from(err)
    fault = state.faults.pick(completion=True)
    if fault == "error":
        return _error(500, "simulated fault: internal server error", code="simulated_fault")
    if fault == "hang":
        return await _never_answer(request)
    if fault == "reset" and not req.stream:
        return await _reset(request)
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    request_id = prefix + (request.headers.get("X-Request-Id") or os.urandom(8).hex())  # 16 hex, as vLLM 0.32
    created = int(time.time())
    slow = fault == "slow"
    if req.stream:
        reset_after = RESET_STREAM_AFTER_CHUNKS if fault == "reset" else 0
        return await _stream(request, state, req, request_id, created, arrival, slow, reset_after)
    outcome = await state.engine.run(req, None, slow=slow, arrival=arrival)
    body = completion_response(req, request_id, created, outcome.text, outcome.finish_reason,
                               outcome.stop_reason, outcome.completion_tokens)
    return web.Response(body=body, content_type=JSON)


async def _stream(request, state, req, request_id, created, arrival, slow, reset_after) -> web.StreamResponse:
    encoder = ChunkEncoder(req, request_id, created)
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    chunks = 0

    async def emit(text: str, finish_reason: str | None, stop_reason: str | None, generated: int) -> None:
        nonlocal chunks
        data = b""
        if chunks == 0 and encoder.chat:
            data = encoder.role()
        if text or finish_reason is not None:
            running_usage = None
            if req.continuous_usage and req.include_usage:
                running_usage = {"prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens + generated,
                                 "completion_tokens": generated}
            data += encoder.token(text, finish_reason, stop_reason, running_usage)
        if data:
            await response.write(data)
            chunks += 1
        if reset_after and chunks >= reset_after and finish_reason is None:
            _reset_connection(request)
            raise ConnectionResetError("simulated fault: connection reset")

    try:
        outcome = await state.engine.run(req, emit, slow=slow, arrival=arrival)
        tail = encoder.usage(outcome.completion_tokens) if req.include_usage else b""
        await response.write(tail + encoder.done())
        await response.write_eof()
    except ConnectionResetError:
        # the client went away (or the reset fault cut it): the engine has let go of the sequence
        pass
    return response


async def get_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE].faults.as_dict())


async def post_faults(request: web.Request) -> web.StreamResponse:
    injector = request.app[STATE].faults
    try:
        body = json.loads(await request.read())
        injector.config = validate_update(injector.config, body)
    except ValueError as exc:
        return _error(400, f"invalid fault configuration: {exc}")
    log.warning("fault injection set to %s", injector.config)
    return web.json_response(injector.as_dict())


def create_app(options: SimOptions) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    state = SimState(options)
    app[STATE] = state

    async def on_startup(app: web.Application) -> None:
        state.started = time.monotonic()

    async def on_cleanup(app: web.Application) -> None:
        await state.engine.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/chat/completions/render", render_chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    if options.enable_fault_api:
        app.router.add_get("/sim/faults", get_faults)
        app.router.add_post("/sim/faults", post_faults)
    return app
