"""The command line, agreed with the rest of the project (see docs/simulator.md)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .faults import MODES, SCOPES
from .profiles import PROFILES


@dataclass(frozen=True)
class SimOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    max_num_seqs: int = 256
    max_model_len: int = 4096
    kv_cache_tokens: int = 65536
    api_key: str | None = None
    seed: int = 0
    profile: str | None = None
    ttft_ms: float = 40.0
    step_ms: float = 8.0                 # --step-ms, or its older spelling --itl-ms
    step_ms_per_token: float = 0.02      # --step-ms-per-token, or --prefill-ms-per-token
    jitter: float = 0.1
    slowdown_per_seq: float = 0.01
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    time_scale: float = 1.0
    stream_interval: int = 1
    default_max_tokens: int | None = None
    output_len_range: tuple[int, int] = (32, 512)
    startup_delay: float = 0.0
    listen_while_loading: bool = False
    fault_rate: float = 0.0
    fault_mode: str = "error"
    fault_scope: str = "completions"
    enable_fault_api: bool = False
    shutdown_timeout: float = 1.0
    keep_alive_timeout: float = 5.0
    access_log: bool = False
    log_level: str = "INFO"

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    @property
    def itl_ms(self) -> float:
        return self.step_ms

    @property
    def prefill_ms_per_token(self) -> float:
        return self.step_ms_per_token


# Built-in values of the settings a --profile may set (used without a profile).
DEFAULTS = {"max_num_seqs": 256, "kv_cache_tokens": 65536, "ttft_ms": 40.0, "step_ms": 8.0,
            "step_ms_per_token": 0.02, "slowdown_per_seq": 0.01, "max_num_batched_tokens": 8192}


def _number(kind, low=None, high=None, what="a number"):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected {what} {bounds}")
        return value
    return convert


def _range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        pair = (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX, e.g. 32:512") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= MIN <= MAX")
    return pair


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpufleet-vllm-sim",
        description="A stand-in for vLLM's OpenAI-compatible server: the same endpoints, shapes and "
                    "metrics, a latency model, a FIFO scheduler and fault injection.")
    p.add_argument("model", metavar="MODEL", help="the model vLLM would load (reported as root in /v1/models)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_number(int, 1, 65535, "a port"), default=8000)
    p.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                   help="model name(s) the API answers to (default: MODEL); the first labels the metrics")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="speed profile of a model on a GPU (step costs, batch limits, KV capacity); "
                        "explicit flags override its values")
    p.add_argument("--max-num-seqs", type=_number(int, 1, what="a whole number"), default=None,
                   help="sequences running at once; the rest wait in FIFO order (default 256)")
    p.add_argument("--max-num-batched-tokens", type=_number(int, 1, what="a whole number"), default=None,
                   help="tokens one engine step computes: a decode token per running sequence plus chunks "
                        "of prefill (default 8192)")
    p.add_argument("--max-model-len", type=_number(int, 16, what="a whole number"), default=4096,
                   help="context length: prompt + max_tokens beyond it is refused with 400")
    p.add_argument("--kv-cache-tokens", type=_number(int, 1, what="a whole number"), default=None,
                   help="KV-cache capacity in tokens (default 65536, or --max-model-len if larger): blocks of "
                        "--block-size, shared by running sequences and the prefix cache")
    p.add_argument("--block-size", type=_number(int, 1, 1024, "a whole number"), default=16,
                   help="tokens per KV block, the unit of prefix caching (default 16, as vLLM)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of a cached prompt prefix (default on, as vLLM V1)")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on /v1/* (default: $VLLM_API_KEY, as vLLM)")
    p.add_argument("--seed", type=_number(int, what="an integer"), default=0,
                   help="seed of the generated text (same prompt + seed, same text) and of the jitter")
    g = p.add_argument_group("latency model (an engine step lasts step-ms + step-ms-per-token x batched tokens)")
    g.add_argument("--step-ms", type=_number(float, 0), default=None,
                   help="fixed cost of an engine step: the inter-token latency of a lone sequence (default 8)")
    g.add_argument("--itl-ms", type=_number(float, 0), default=None, help="the older name of --step-ms")
    g.add_argument("--step-ms-per-token", type=_number(float, 0), default=None,
                   help="cost of each batched token, prefill or decode (default 0.02)")
    g.add_argument("--prefill-ms-per-token", type=_number(float, 0), default=None,
                   help="the older name of --step-ms-per-token")
    g.add_argument("--ttft-ms", type=_number(float, 0), default=None,
                   help="time to first token of a lone short prompt (default 40): a newly admitted sequence "
                        "waits ttft-ms - step-ms before its prefill, without slowing the others")
    g.add_argument("--jitter", type=_number(float, 0, 1), default=0.1,
                   help="each latency varies uniformly by ± this fraction")
    g.add_argument("--slowdown-per-seq", type=_number(float, 0), default=None,
                   help="each running sequence beyond the first makes steps this fraction slower (default 0.01)")
    g.add_argument("--time-scale", type=_number(float, 0), default=1.0, metavar="F",
                   help="multiply every simulated duration by F (slow a whole fleet down to fit a small machine)")
    g.add_argument("--stream-interval", type=_number(int, 1, what="a whole number"), default=1,
                   help="tokens of a stream merged into one SSE event (default 1, as vLLM)")
    g.add_argument("--default-max-tokens", type=_number(int, 1, what="a whole number"), default=None,
                   help="max_tokens when a request gives none (default as vLLM: 16 for text completions, "
                        "the rest of the context for chat)")
    g.add_argument("--output-len-range", type=_range, default=(32, 512), metavar="MIN:MAX",
                   help="natural answer length before end-of-sequence (finish_reason stop), "
                        "drawn per prompt (default 32:512)")
    g.add_argument("--startup-delay", type=_number(float, 0), default=0.0,
                   help="seconds of 'loading the model' after start: the port stays closed, as vLLM's")
    g.add_argument("--listen-while-loading", action="store_true",
                   help="listen during --startup-delay and answer 503 (not what vLLM does)")
    f = p.add_argument_group("fault injection")
    f.add_argument("--fault-rate", type=_number(float, 0, 1), default=0.0,
                   help="fraction of completion requests that get the fault")
    f.add_argument("--fault-mode", choices=MODES[1:], default="error")
    f.add_argument("--fault-scope", choices=SCOPES, default="completions",
                   help="'all' also breaks /health, /v1/models and /metrics")
    f.add_argument("--enable-fault-api", action="store_true", help="expose GET/POST /sim/faults")
    p.add_argument("--shutdown-timeout", type=_number(float, 0), default=1.0,
                   help="seconds to let requests finish on SIGTERM")
    p.add_argument("--keep-alive-timeout", type=_number(float, 0), default=5.0, metavar="SECONDS",
                   help="close a keep-alive connection idle this long (default 5, as vLLM's uvicorn)")
    p.add_argument("--access-log", action="store_true", help="log every request (slower)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   type=str.upper)
    return p


def _first(*values):
    return next(v for v in values if v is not None)


def parse_args(argv: list[str] | None = None) -> SimOptions:
    parser = build_parser()
    a = parser.parse_args(argv)
    profile = vars(PROFILES[a.profile]) if a.profile else {}

    def pick(name: str, *explicit):
        """An explicit flag first, then the profile's value, then the built-in default."""
        return _first(*explicit, profile.get(name), DEFAULTS[name])

    kv_cache_tokens = pick("kv_cache_tokens", a.kv_cache_tokens)
    if a.kv_cache_tokens is None:
        kv_cache_tokens = max(kv_cache_tokens, a.max_model_len)   # a default always fits one full request
    if kv_cache_tokens < a.max_model_len:
        parser.error(f"--kv-cache-tokens {kv_cache_tokens} is smaller than --max-model-len {a.max_model_len}: "
                     "a request of the full context could never be admitted (vLLM refuses to start too); "
                     "raise --kv-cache-tokens or lower --max-model-len")
    return SimOptions(
        model=a.model, host=a.host, port=a.port, served_model_names=tuple(a.served_model_name),
        max_num_seqs=pick("max_num_seqs", a.max_num_seqs), max_model_len=a.max_model_len,
        kv_cache_tokens=kv_cache_tokens,
        api_key=a.api_key or os.environ.get("VLLM_API_KEY") or None, seed=a.seed, profile=a.profile,
        ttft_ms=pick("ttft_ms", a.ttft_ms), step_ms=pick("step_ms", a.step_ms, a.itl_ms),
        step_ms_per_token=pick("step_ms_per_token", a.step_ms_per_token, a.prefill_ms_per_token),
        jitter=a.jitter, slowdown_per_seq=pick("slowdown_per_seq", a.slowdown_per_seq),
        max_num_batched_tokens=pick("max_num_batched_tokens", a.max_num_batched_tokens),
        block_size=a.block_size, enable_prefix_caching=a.enable_prefix_caching, time_scale=a.time_scale,
        stream_interval=a.stream_interval,
        default_max_tokens=a.default_max_tokens, output_len_range=a.output_len_range,
        startup_delay=a.startup_delay, listen_while_loading=a.listen_while_loading,
        fault_rate=a.fault_rate, fault_mode=a.fault_mode,
        fault_scope=a.fault_scope, enable_fault_api=a.enable_fault_api,
        shutdown_timeout=a.shutdown_timeout, keep_alive_timeout=a.keep_alive_timeout,
        access_log=a.access_log, log_level=a.log_level)
