"""``gpufleet-router``: gunicorn with gevent workers serving :func:`create_app`.

The main process validates the configuration (exit 2 with a clear message), prepares
what the worker processes share (the breaker table in shared memory, the directory of
the multiprocess metrics), then forks ``GPUFLEET_ROUTER_PROCESSES`` workers.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile

from gpufleet.common.config import ConfigError, exit_on_config_error, redact_url
from gpufleet.common.logs import setup_logging

from .config import RouterConfig


def _metrics_dir(configured: str | None) -> str:
    """An empty directory for prometheus_client's multiprocess files (set before it is
    imported: it picks its storage at import time)."""
    if configured:
        os.makedirs(configured, exist_ok=True)
        for name in os.listdir(configured):
            if name.endswith(".db"):
                os.unlink(os.path.join(configured, name))
        return configured
    path = tempfile.mkdtemp(prefix="gpufleet-router-metrics-")
    atexit.register(shutil.rmtree, path, True)
    return path


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    config = RouterConfig.from_env()
    log = setup_logging("gpufleet.router", config.log_level)
    # gunicorn's gevent worker patches after the fork; patching here first keeps redis and
    # urllib3 (imported below) from holding unpatched references to ssl and socket
    from gevent import monkey
    monkey.patch_all()

    import redis

    from gpufleet.common.server import serve

    try:
        redis.Redis.from_url(config.redis_url)
    except ValueError as exc:
        raise ConfigError(f"GPUFLEET_REDIS_URL={redact_url(config.redis_url)!r} is not usable: {exc}") from None
    metrics_dir = _metrics_dir(config.metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config = dataclasses.replace(config, metrics_dir=metrics_dir)

    from prometheus_client import multiprocess

    from .app import create_app
    from .breaker import BreakerTable

    table = BreakerTable(shared=True)  # made before the fork: every process maps the same memory

    def child_exit(_server, worker):
        multiprocess.mark_process_dead(worker.pid, metrics_dir)

    log.info("gpufleet-router on %s://%s:%d, %d process(es), policy %s, redis %s", config.scheme, config.host,
             config.port, config.processes, config.policy, redact_url(config.redis_url))
    tls = {"certfile": config.tls_cert_file, "keyfile": config.tls_key_file} if config.tls_cert_file else {}
    serve(lambda: create_app(config, breaker_table=table), config.host, config.port,
          workers=config.processes, worker_class="gpufleet.router.worker.RouterWorker",
          worker_connections=10000, keepalive=75,
          extra={"child_exit": child_exit, "loglevel": config.log_level.lower(), **tls})


if __name__ == "__main__":
    main()
