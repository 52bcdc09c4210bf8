"""PostgreSQL access: a small thread-safe connection pool and transaction helper.

The API runs under gunicorn's threaded workers (``gthread``), so plain blocking psycopg2
with ``ThreadedConnectionPool`` is correct without any green-thread wait callback.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import psycopg2
import psycopg2.extras
import psycopg2.pool

log = logging.getLogger(__name__)

# Advisory lock keys (one namespace for gpufleet): migrations, reconciler leadership, API keys.
LOCK_MIGRATIONS = 0x67660001
LOCK_RECONCILER_LEADER = 0x67660002
# two-key form (this, hashtext(model_id)): the scaling sequence of one model
LOCK_SCALING_MODEL = 0x67660003
# API key changes (shared) against the reconciler's full key sync (exclusive): keysync.py
LOCK_API_KEYS = 0x67660004

psycopg2.extras.register_default_jsonb(globally=True)


def connect(dsn: str, *, application_name: str = "gpufleet", connect_timeout: int = 5):
    return psycopg2.connect(dsn, application_name=application_name, connect_timeout=connect_timeout,
                            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)


class Database:
    """A lazily opened pool; ``with db.cursor() as cur`` runs one transaction."""

    def __init__(self, dsn: str, *, minconn: int = 1, maxconn: int = 8, application_name: str = "gpufleet"):
        self.dsn = dsn
        self.minconn = minconn
        self.maxconn = maxconn
        self.application_name = application_name
        self._pool: psycopg2.pool.ThreadedConnectionPool | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(maxconn)

    def _get_pool(self) -> psycopg2.pool.ThreadedConnectionPool:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = psycopg2.pool.ThreadedConnectionPool(
                        0, self.maxconn, self.dsn, application_name=self.application_name,
                        connect_timeout=5, keepalives=1, keepalives_idle=10, keepalives_interval=5,
                        keepalives_count=3)
        return self._pool

    @contextlib.contextmanager
    def connection(self):
        # the semaphore makes callers wait for a free connection instead of failing with
        # "connection pool exhausted" when more threads than connections are busy
        if not self._slots.acquire(timeout=30):
            raise psycopg2.OperationalError("no database connection free after 30 s")
        pool = None
        conn = None
        broken = False
        try:
            pool = self._get_pool()
            conn = pool.getconn()
            try:
                yield conn
                conn.commit()
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                broken = True
                raise
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
        finally:
            if conn is not None and pool is not None:
                pool.putconn(conn, close=broken or bool(conn.closed))
            self._slots.release()

    @contextlib.contextmanager
    def cursor(self):
        with self.connection() as conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            yield cur

    def ping(self) -> bool:
        try:
            with self.cursor() as cur:
                cur.execute("SELECT 1 AS ok")
                return cur.fetchone()["ok"] == 1
        except psycopg2.Error as exc:
            log.warning("database unreachable: %s", exc)
            return False

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.closeall()
                self._pool = None
