"""Secrets and their hashes: tokens and API keys are shown once and stored only as hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets

WORKER_TOKEN_PREFIX = "gfw_"
JOIN_SECRET_PREFIX = "gfj_"
API_KEY_PREFIX = "gfk_"
ADMIN_TOKEN_PREFIX = "gfa_"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def same_hash(secret: str, expected_hex: str) -> bool:
    """Constant-time comparison of a presented secret against a stored hash."""
    return hmac.compare_digest(sha256_hex(secret), expected_hex)


def display_prefix(secret: str, length: int = 10) -> str:
    """The first characters of a secret, safe to store and show to identify it."""
    return secret[:length]
