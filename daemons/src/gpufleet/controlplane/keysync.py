"""API keys in Redis that no reconciler cycle can bring back or take away.

The admin API changes a key (create, revoke) and writes Redis in one PostgreSQL
transaction holding a *shared* advisory lock; the reconciler's full re-sync (which repairs
drift: a Redis restart, a lost write) reads the active keys and rewrites ``apikey:*``
holding the same lock *exclusively*. So a sync never works from a snapshot older than a
change it could overwrite: a revoked key cannot be written back and a new one cannot be
deleted, and both are in Redis before the admin call returns.
"""

from __future__ import annotations

from gpufleet.controlplane import keystore
from gpufleet.controlplane.db import LOCK_API_KEYS, Database


def lock_for_change(cur) -> None:
    """Called first in the transaction of an admin key change (several may run at once)."""
    cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (LOCK_API_KEYS,))


def sync_keys(db: Database, publisher) -> dict[str, int]:
    """Make ``apikey:*`` exactly the active keys, with no key change in flight."""
    with db.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_API_KEYS,))
        keys = keystore.active_keys(cur)
        return publisher.sync_api_keys(keys)
