"""The worker's auth token: held in memory, persisted to WORKER_AUTH_TOKEN_FILE (0600).

Where it comes from, in order: ``WORKER_AUTH_TOKEN`` (set by the operator or the role),
else the token file (written by an earlier enrolment or by the role after a rotation),
else none — the agent then enrols: its first register presents the one-time join secret
of ``WORKER_JOIN_SECRET_FILE`` and the control plane answers with the token, once.
Neither secret is ever logged.
"""

from __future__ import annotations

import logging
import threading

from gpufleet.common.secretfile import read_secret_file as read_token_file
from gpufleet.common.secretfile import write_secret_file as write_token_file

log = logging.getLogger("gpufleet.agent.tokens")


class TokenStore:
    def __init__(self, env_token: str | None = None, path: str | None = None,
                 join_secret_path: str | None = None):
        self._env_token = env_token
        self.path = path
        self.join_secret_path = join_secret_path
        self._lock = threading.Lock()
        self._token = env_token or read_token_file(path)

    def join_secret(self) -> str | None:
        """The join secret to enrol with, read afresh each time (the role may deliver a new
        one while the agent retries); None when the agent holds a token or has no file."""
        if self._token is not None:
            return None
        return read_token_file(self.join_secret_path)

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
