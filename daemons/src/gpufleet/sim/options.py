"""The command line, agreed with the rest of the project (see docs/simulator.md)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .faults import MODES, SCOPES


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
    ttft_ms: float = 40.0
    itl_ms: float = 8.0
    prefill_ms_per_token: float = 0.02
    jitter: float = 0.1
    slowdown_per_seq: float = 0.01
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
    p.add_argument("--max-num-seqs", type=_number(int, 1, what="a whole number"), default=256,
                   help="sequences running at once; the rest wait in FIFO order")
    p.add_argument("--max-model-len", type=_number(int, 16, what="a whole number"), default=4096,
                   help="context length: prompt + max_tokens beyond it is refused with 400")
    p.add_argument("--kv-cache-tokens", type=_number(int, 1, what="a whole number"), default=65536,
                   help="KV-cache capacity in tokens, for vllm:kv_cache_usage_perc")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on /v1/* (default: $VLLM_API_KEY, as vLLM)")
    p.add_argument("--seed", type=_number(int, what="an integer"), default=0,
                   help="seed of the generated text (same prompt + seed, same text) and of the jitter")
    g = p.add_argument_group("latency model")
    g.add_argument("--ttft-ms", type=_number(float, 0), default=40.0, help="base time to first token")
    g.add_argument("--itl-ms", type=_number(float, 0), default=8.0, help="inter-token latency")
    g.add_argument("--prefill-ms-per-token", type=_number(float, 0), default=0.02,
                   help="extra time to first token per prompt token")
    g.add_argument("--jitter", type=_number(float, 0, 1), default=0.1,
                   help="each latency varies uniformly by ± this fraction")
    g.add_argument("--slowdown-per-seq", type=_number(float, 0), default=0.01,
                   help="each running sequence beyond the first makes steps this fraction slower")
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


def parse_args(argv: list[str] | None = None) -> SimOptions:
    a = build_parser().parse_args(argv)
    return SimOptions(
        model=a.model, host=a.host, port=a.port, served_model_names=tuple(a.served_model_name),
        max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, kv_cache_tokens=a.kv_cache_tokens,
        api_key=a.api_key or os.environ.get("VLLM_API_KEY") or None, seed=a.seed, ttft_ms=a.ttft_ms, itl_ms=a.itl_ms,
        prefill_ms_per_token=a.prefill_ms_per_token, jitter=a.jitter, slowdown_per_seq=a.slowdown_per_seq,
        default_max_tokens=a.default_max_tokens, output_len_range=a.output_len_range,
        startup_delay=a.startup_delay, listen_while_loading=a.listen_while_loading,
        fault_rate=a.fault_rate, fault_mode=a.fault_mode,
        fault_scope=a.fault_scope, enable_fault_api=a.enable_fault_api,
        shutdown_timeout=a.shutdown_timeout, keep_alive_timeout=a.keep_alive_timeout,
        access_log=a.access_log, log_level=a.log_level)
