"""Secret files (worker tokens, join secrets): read stripped, written atomically with mode 0600."""

from __future__ import annotations

import logging
import os
import tempfile

log = logging.getLogger(__name__)


def read_secret_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the secret file %s: %s", path, exc.strerror)
        return None
    return token or None


def write_secret_file(path: str, token: str) -> None:
    """Atomically replace ``path`` with the secret, readable by its owner only (mode 0600
    from the start: the temporary file is created 0600 by mkstemp)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gpufleet-secret-", dir=folder)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
