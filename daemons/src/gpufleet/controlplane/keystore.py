"""SQL for API keys (stored as SHA-256 hex + a display prefix, never the key)."""

from __future__ import annotations

import secrets

from gpufleet.common.ids import API_KEY_PREFIX, display_prefix, new_secret, sha256_hex

_PUBLIC = "key_id, name, key_prefix, models, rpm, created_at, revoked_at"


def create_key(cur, name: str, models: list[str], rpm: int) -> tuple[dict, str]:
    """Returns (row including key_hash, the clear key). The clear key is never stored."""
    key = new_secret(API_KEY_PREFIX)
    key_id = "key_" + secrets.token_hex(6)
    cur.execute(f"""INSERT INTO api_keys (key_id, name, key_hash, key_prefix, models, rpm)
                    VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_PUBLIC}, key_hash""",
                (key_id, name, sha256_hex(key), display_prefix(key, 12), list(models), rpm))
    return cur.fetchone(), key


def list_keys(cur, include_revoked: bool = True):
    cur.execute(f"""SELECT {_PUBLIC} FROM api_keys WHERE %s OR revoked_at IS NULL
                    ORDER BY created_at, key_id""", (include_revoked,))
    return cur.fetchall()


def revoke_key(cur, key_id: str):
    """Mark revoked; returns the row (with key_hash) or None when unknown."""
    cur.execute(f"""UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = %s
                    RETURNING {_PUBLIC}, key_hash""", (key_id,))
    return cur.fetchone()


def active_keys(cur):
    cur.execute("SELECT key_hash, key_id, name, models, rpm FROM api_keys WHERE revoked_at IS NULL")
    return cur.fetchall()
