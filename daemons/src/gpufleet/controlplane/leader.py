"""Leader election on a PostgreSQL session advisory lock.

The lock lives as long as the session of one dedicated connection: if the leader dies
(or its connection drops), PostgreSQL releases it and the next follower's
``pg_try_advisory_lock`` wins. A leader checks its connection before every cycle, so a
leader cut off from the database stops acting instead of racing the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import psycopg2

from gpufleet.controlplane.db import LOCK_RECONCILER_LEADER, connect

log = logging.getLogger(__name__)


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaderLock:
    def __init__(self, dsn: str, key: int = LOCK_RECONCILER_LEADER, name: str | None = None):
        self.dsn = dsn
        self.key = key
        self.name = name or identity()
        self._conn = None
        self.held = False

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, application_name=f"gpufleet-reconciler {self.name}"[:63])
            self._conn.autocommit = True
            # server-side keepalives for this session: if the leader's host vanishes from
            # the network, PostgreSQL drops the session (and the lock) within about 25 s
            # instead of the kernel default of hours, so a follower can take over
            with self._conn.cursor() as cur:
                cur.execute("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                            "SET tcp_keepalives_count = 3")
        return self._conn

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False (and no exception) when the DB is unreachable."""
        try:
            with self._connection().cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (self.key,))
                self.held = bool(cur.fetchone()[0])
        except psycopg2.Error as exc:
            log.warning("leader election: database unreachable: %s", str(exc).strip())
            self._drop()
        return self.held

    def still_held(self) -> bool:
        """True while our session (and so the lock) is alive."""
        if not self.held:
            return False
        try:
            with self._connection().cursor() as cur:
                cur.execute("""SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                               AND pid = pg_backend_pid() AND granted
                               AND ((classid::bigint << 32) | objid::bigint) = %s""", (self.key,))
                self.held = cur.fetchone()[0] > 0
        except psycopg2.Error as exc:
            log.error("leader election: lost the database session, stepping down: %s", str(exc).strip())
            self._drop()
        return self.held

    def release(self) -> None:
        if self._conn is not None and not self._conn.closed and self.held:
            with contextlib.suppress(psycopg2.Error), self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self._drop()

    def _drop(self) -> None:
        self.held = False
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = None
