"""``gpufleet-agent``: validate the environment, then serve the agent under gunicorn."""

from __future__ import annotations

import os

from gpufleet.common.config import exit_on_config_error
from gpufleet.common.logs import setup_logging
from gpufleet.common.server import serve

from .config import load_config


@exit_on_config_error
def main() -> None:
    config = load_config(os.environ)
    setup_logging("gpufleet.agent", config.log_level)

    def factory():
        # Runs in the gunicorn worker after the fork (and after gevent's monkey-patching),
        # so the background loops live in the process that serves the requests.
        from .app import create_app
        setup_logging("gpufleet.agent", config.log_level)
        return create_app(config)

    # One worker: the agent's state (token, drain flag, metric windows) lives in one process.
    # Every request is instant, so a short graceful timeout only cuts idle keep-alive
    # connections (the reconciler's probes) instead of holding a stop for seconds.
    serve(factory, config.bind_host, config.bind_port, workers=1, worker_class="gevent",
          graceful_timeout=1, keepalive=10, extra={"worker_exit": _stop_loops},
          extra_hosts=config.extra_bind_hosts)


def _stop_loops(server, worker) -> None:
    """gunicorn's worker_exit hook: end the background loops so the worker exits at once."""
    app = getattr(worker, "wsgi", None)
    agent = getattr(app, "extensions", {}).get("gpufleet_agent") if app is not None else None
    if agent is not None:
        agent.stop()


if __name__ == "__main__":
    main()
