"""The worker's auth token: held in memory, persisted to WORKER_AUTH_TOKEN_FILE (0600).

Where it comes from, in order: ``WORKER_AUTH_TOKEN`` (set by the operator or the role),
else the token file (written by an earlier bootstrap or by the role after a rotation),
else none — the agent then bootstraps one from the control plane, once.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

log = logging.getLogger("gpufleet.agent.tokens")


def read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the worker token file %s: %s", path, exc.strerror)
        return None
    return token or None


def write_token_file(path: str, token: str) -> None:
    """Atomically replace ``path`` with the token, readable by its owner only."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".worker-token-", dir=folder)
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


class TokenStore:
    def __init__(self, env_token: str | None = None, path: str | None = None):
        self._env_token = env_token
        self.path = path
        self._lock = threading.Lock()
        self._token = env_token or read_token_file(path)

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def source(self) -> str:
        if self._token is None:
            return "none"
        if self._env_token is not None and self._token == self._env_token:
            return "env"
        return "file" if self.path else "memory"

    def store_bootstrapped(self, token: str) -> None:
        """Keep a token the control plane just issued, and persist it when a file is set."""
        with self._lock:
            self._token = token
            if self.path:
                try:
                    write_token_file(self.path, token)
                except OSError as exc:
                    # Keep going with the token in memory: losing it on a restart (recoverable by
                    # rotation) beats a worker that cannot register at all.
                    log.error("could not write the worker token to %s (%s): it lives only in memory until "
                              "fixed; a restart will need `gpufleet tokens rotate`", self.path, exc.strerror)
                    return
                log.info("stored the bootstrapped worker token in %s (mode 0600)", self.path)
            else:
                log.warning("bootstrapped a worker token but WORKER_AUTH_TOKEN_FILE is not set: it lives "
                            "only in memory, and a restart will need `gpufleet tokens rotate`")

    def reload_if_changed(self) -> bool:
        """After a rejection: pick up a token written to the file since (e.g. by a rotation)."""
        if not self.path:
            return False
        with self._lock:
            fresh = read_token_file(self.path)
            if fresh and fresh != self._token:
                self._token = fresh
                log.info("loaded a new worker token from %s", self.path)
                return True
        return False
