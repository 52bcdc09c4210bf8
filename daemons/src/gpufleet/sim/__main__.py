"""``gpufleet-vllm-sim MODEL [options]``: serve the simulator until SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time

from aiohttp import web

from gpufleet.common.logs import setup_logging

from .app import create_app
from .options import parse_args


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    log = setup_logging("gpufleet.sim", options.log_level)
    if not options.access_log:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    latency = (f"profile {options.profile or 'none'}: step {options.step_ms} ms + {options.step_ms_per_token} ms "
               f"per batched token (max {options.max_num_batched_tokens}), ttft {options.ttft_ms} ms, "
               f"jitter {options.jitter}, time scale {options.time_scale}, KV {options.kv_cache_tokens} tokens "
               f"in blocks of {options.block_size}, prefix caching "
               f"{'on' if options.enable_prefix_caching else 'off'}, startup delay {options.startup_delay} s")
    if options.startup_delay and not options.listen_while_loading:
        # vLLM opens its port only once the model is loaded: a client meets "connection refused"
        log.info("gpufleet-vllm-sim: loading the model for %.1f s (port %d closed until then, as vLLM's)",
                 options.startup_delay, options.port)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        time.sleep(options.startup_delay)
        options = dataclasses.replace(options, startup_delay=0.0)
    app = create_app(options)
    log.info("gpufleet-vllm-sim: serving %s as %s on http://%s:%d (max-num-seqs %d, %s)",
             options.model, ", ".join(options.served_names), options.host, options.port,
             options.max_num_seqs, latency)
    web.run_app(app, host=options.host, port=options.port, print=None, backlog=2048,
                access_log=logging.getLogger("aiohttp.access") if options.access_log else None,
                handler_cancellation=True, shutdown_timeout=options.shutdown_timeout,
                keepalive_timeout=options.keep_alive_timeout)


if __name__ == "__main__":
    main()
