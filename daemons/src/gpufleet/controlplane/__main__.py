"""``gpufleet-controlplane``: the API under gunicorn (threaded workers).

Environment: see docs/controlplane.md. With ``GPUFLEET_MIGRATE_ON_START=true`` the schema
is migrated before serving (the role runs ``gpufleet db migrate`` instead).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from gpufleet.common.config import exit_on_config_error
from gpufleet.common.logs import setup_logging
from gpufleet.controlplane.config import ControlPlaneConfig


def _multiprocess_metrics(workers: int) -> dict:
    """Several gunicorn processes share counters through prometheus_client's multiprocess
    mode; the directory must be set before prometheus_client is imported."""
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return {}
    directory = tempfile.mkdtemp(prefix="gpufleet-cp-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    master = os.getpid()

    def cleanup():
        # gunicorn's workers are forks that leave through sys.exit, running atexit too:
        # only the master may remove the directory the other workers still write to
        if os.getpid() == master:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(cleanup)

    def child_exit(server, worker):
        from prometheus_client import multiprocess  # noqa: PLC0415

        multiprocess.mark_process_dead(worker.pid)

    return {"child_exit": child_exit}


@exit_on_config_error
def main() -> None:
    config = ControlPlaneConfig.from_env()
    extra = _multiprocess_metrics(config.workers)
    log = setup_logging("gpufleet.controlplane", config.log_level)
    if config.migrate_on_start:
        from gpufleet.controlplane.migrate import migrate  # noqa: PLC0415

        applied = migrate(config.database_url)
        log.info("migrations: %s", ", ".join(applied) if applied else "up to date")
    log.info("control plane on %s:%d (%d processes): %s", config.bind_host, config.bind_port,
             config.workers, config.describe())

    from gpufleet.common.server import serve  # noqa: PLC0415
    from gpufleet.controlplane.app import create_app  # noqa: PLC0415

    serve(lambda: create_app(config), config.bind_host, config.bind_port, workers=config.workers,
          worker_class="gthread", timeout=60, keepalive=30,
          # no gunicorn control socket: one shared path per user would collide when
          # several daemons run on one host, and nothing here uses it
          extra={"threads": 8, "control_socket_disable": True, **extra})


if __name__ == "__main__":
    main()
