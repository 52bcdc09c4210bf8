"""Prompt probes: the API asks, the reconciler probes.

A heartbeat saying ``ready`` for a worker whose last probe did not pass asks for a probe
now (``request_probe``: a PostgreSQL NOTIFY, delivered when the heartbeat's transaction
commits), so a new worker is routable within a heartbeat or so — without a request
handler ever calling a worker. The leading reconciler LISTENs (``ProbeRequests``) between
its cycles and probes those workers with the same deadline-bound prober.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time

import psycopg2

from gpufleet.controlplane.db import connect

log = logging.getLogger(__name__)

CHANNEL = "gpufleet_probe"


def request_probe(cur, worker_id: str) -> None:
    cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, worker_id))


class ProbeRequests:
    """The reconciler's side: a dedicated LISTEN connection; ``wait(timeout)`` returns the
    worker ids asked for (deduplicated), or an empty set when the time is up."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._conn = None

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, application_name="gpufleet-reconciler probe requests")
            self._conn.autocommit = True
            with self._conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
        return self._conn

    def wait(self, timeout_s: float) -> set[str]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        try:
            conn = self._connection()
            while True:
                conn.poll()
                if conn.notifies:
                    asked = {n.payload for n in conn.notifies}
                    conn.notifies.clear()
                    return asked
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return set()
                select.select([conn], [], [], remaining)
        except (psycopg2.Error, OSError) as exc:
            log.warning("probe requests: database connection lost (%s); cycles still probe everyone", exc)
            self.close()
            time.sleep(max(0.0, deadline - time.monotonic()))
            return set()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = None
