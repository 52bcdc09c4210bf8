"""Versioned schema migrations: ``migrations/NNNN_name.sql`` applied in order, each in
its own transaction, recorded in ``schema_migrations``. A session advisory lock makes
concurrent runs (two hosts running ``gpufleet db migrate`` at once) safe; a second run
finds nothing to do."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from gpufleet.controlplane.db import LOCK_MIGRATIONS, connect

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("gpufleet.controlplane").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version number: {versions}")
    return found


def migrate(dsn: str) -> list[str]:
    """Apply the pending migrations; returns the names applied (empty when up to date)."""
    conn = connect(dsn, application_name="gpufleet-migrate")
    applied: list[str] = []
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_MIGRATIONS,))
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                               version    integer PRIMARY KEY,
                               name       text NOT NULL,
                               applied_at timestamptz NOT NULL DEFAULT now())""")
            conn.commit()
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
        conn.commit()
        for migration in available_migrations():
            if migration.version in done:
                continue
            label = f"{migration.version:04d}_{migration.name}"
            try:
                with conn.cursor() as cur:
                    cur.execute(migration.sql)
                    cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                (migration.version, migration.name))
                conn.commit()
            except Exception:
                conn.rollback()
                log.error("migration %s failed; nothing of it was applied", label)
                raise
            log.info("applied migration %s", label)
            applied.append(label)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_MIGRATIONS,))
        conn.commit()
    finally:
        conn.close()
    return applied


def current_version(dsn: str) -> int:
    conn = connect(dsn, application_name="gpufleet-migrate")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not cur.fetchone()[0]:
                return 0
            cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            return cur.fetchone()[0]
    finally:
        conn.close()
