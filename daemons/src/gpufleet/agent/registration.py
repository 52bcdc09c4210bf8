"""Registration and heartbeats towards the control plane (DESIGN.md, control plane contract).

One loop: register (enrolling with the join secret when no token is held), then heartbeat every
``heartbeat_interval_s`` the control plane returned, and at once when woken by a status
change. Failures never end the loop: an unreachable control plane and a rejected
credential are both retried with exponential back-off and jitter. With no token, the
register presents the join secret of WORKER_JOIN_SECRET_FILE (read afresh on each try, so
a newly delivered one is picked up); a new token written to WORKER_AUTH_TOKEN_FILE (a
rotation) is picked up on the next attempt after a refusal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import requests

from .backoff import Backoff
from .config import AgentConfig
from .tokens import TokenStore

log = logging.getLogger("gpufleet.agent.registration")

REJECTING = {401: "the credential was refused (401)",
             403: "the token may not act as this instance, model or worker id (403)",
             409: "the control plane knows this worker for another model (409)"}
REQUEST_TIMEOUT_S = 5.0


def _error_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return message or resp.text[:200]


class Registrar:
    def __init__(self, config: AgentConfig, tokens: TokenStore,
                 register_payload: Callable[[], dict], heartbeat_payload: Callable[[], dict],
                 on_desired_status: Callable[[str | None], None] = lambda _: None,
                 clock=time.monotonic):
        self.config = config
        self.tokens = tokens
        self._register_payload = register_payload
        self._heartbeat_payload = heartbeat_payload
        self._on_desired_status = on_desired_status
        self._clock = clock
        self._session = requests.Session()
        self._backoff = Backoff(base_s=0.5, cap_s=config.retry_max_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.registered = False
        self.accepted = False  # the last register/heartbeat answer was an acceptance
        self.state = "unregistered"  # unregistered | registered | rejected | unreachable
        self.detail = "not registered yet"
        self.worker_id = config.worker_id
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.last_accepted_at: float | None = None
        self.last_status_sent: str | None = None
        self.counts = {"accepted": 0, "rejected": 0, "error": 0}
        self._last_logged: str | None = None

    # -- wiring --------------------------------------------------------------------------

    def poke(self) -> None:
        """Send a heartbeat now (a status change); harmless while not registered."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _url(self, path: str) -> str:
        return self.config.control_plane_url + path

    def _auth(self, *, enrol: bool = False) -> dict:
        secret = self.tokens.token or (self.tokens.join_secret() if enrol else None)
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    def _log_once(self, level: int, message: str, *args) -> None:
        """Log a failure when it changes, not on every retry."""
        key = message % args
        if key != self._last_logged:
            log.log(level, message, *args)
            self._last_logged = key

    # -- one attempt each ------------------------------------------------------------------

    def register(self) -> bool:
        if self.state == "rejected":
            self.tokens.reload_if_changed()
        enrolling = self.tokens.token is None
        headers = self._auth(enrol=True)
        if enrolling and not headers:
            return self._rejected("register", 0, "the agent holds no worker token and no join secret: write "
                                  "the one from `gpufleet instances join-secret "
                                  f"{self.config.instance_id}` to WORKER_JOIN_SECRET_FILE (mode 0600)")
        try:
            resp = self._session.post(self._url("/internal/worker/register"), json=self._register_payload(),
                                      headers=headers, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            return self._unreachable("register", f"{type(exc).__name__}")
        if resp.status_code == 200:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            token = body.get("bootstrap_token") if isinstance(body, dict) else None
            if token:
                self.tokens.store_bootstrapped(token)
                log.info("enrolled with the join secret: got a worker token for instance %s",
                         self.config.instance_id)
            if self.tokens.token is None:
                return self._rejected("register", 200, "the control plane accepted the registration "
                                      "but issued no token")
            self.worker_id = str(body.get("worker_id") or self.worker_id)
            self._adopt_interval(body)
            self.registered, self.accepted, self.state = True, True, "registered"
            self.detail = "registered"
            self.last_accepted_at = self._clock()
            self.counts["accepted"] += 1
            self._backoff.reset()
            self._last_logged = None
            log.info("registered worker %s (heartbeat every %gs, token from %s)", self.worker_id,
                     self.heartbeat_interval_s, self.tokens.source)
            return True
        if resp.status_code >= 500:
            return self._unreachable("register", f"HTTP {resp.status_code}")
        what = REJECTING.get(resp.status_code, f"HTTP {resp.status_code}")
        if enrolling and resp.status_code == 401:
            what = ("the join secret was refused (401: wrong, expired or already used): issue a new one with "
                    f"`gpufleet instances join-secret {self.config.instance_id}` into WORKER_JOIN_SECRET_FILE")
        return self._rejected("register", resp.status_code, f"{what}: {_error_message(resp)}")

    def heartbeat(self) -> bool:
        payload = self._heartbeat_payload()
        try:
            resp = self._session.post(self._url("/internal/worker/heartbeat"), json=payload,
                                      headers=self._auth(), timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            return self._unreachable("heartbeat", type(exc).__name__)
        if resp.status_code == 200:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            self.accepted, self.state, self.detail = True, "registered", "heartbeat accepted"
            self.last_accepted_at = self._clock()
            self.last_status_sent = payload.get("status")
            self.counts["accepted"] += 1
            self._backoff.reset()
            self._last_logged = None
            self._adopt_interval(body)
            self._on_desired_status(body.get("desired_status"))
            return True
        if resp.status_code >= 500:
            return self._unreachable("heartbeat", f"HTTP {resp.status_code}")
        # Rejected (or the control plane forgot this worker): register again, with back-off.
        self.registered = False
        what = REJECTING.get(resp.status_code, f"HTTP {resp.status_code}")
        return self._rejected("heartbeat", resp.status_code, f"{what}: {_error_message(resp)}")

    def _adopt_interval(self, body: dict) -> None:
        try:
            interval = float(body.get("heartbeat_interval_s") or 0)
        except (TypeError, ValueError):
            interval = 0
        if interval > 0:
            self.heartbeat_interval_s = interval

    def _unreachable(self, call: str, why: str) -> bool:
        # A network failure is no verdict on the token: `accepted` keeps its last value.
        self.state = "unreachable"
        self.detail = f"{call} failed: control plane unreachable ({why})"
        self.counts["error"] += 1
        self._log_once(logging.WARNING, "%s to %s failed (%s); retrying with back-off", call,
                       self.config.control_plane_url, why)
        return False

    def _rejected(self, call: str, status: int, message: str) -> bool:
        self.accepted, self.state = False, "rejected"
        self.detail = f"{call} rejected: {message}"
        self.counts["rejected"] += 1
        self._log_once(logging.ERROR, "%s rejected by the control plane: %s (token source: %s); "
                       "not ready, retrying with back-off", call, message, self.tokens.source)
        return False

    # -- loop ------------------------------------------------------------------------------

    def next_delay(self, ok: bool) -> float:
        if ok:
            return self.heartbeat_interval_s
        delay = self._backoff.next_delay()
        return min(delay, self.heartbeat_interval_s) if self.registered else delay

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                # Right after registering, report the status at once.
                ok = self.heartbeat() if self.registered else (self.register() and self.heartbeat())
            except Exception:  # noqa: BLE001 - the loop must outlive any bug in one attempt
                log.exception("talking to the control plane failed")
                ok = False
            delay = self.next_delay(ok)
            if self.registered:
                self._wake.wait(delay)  # a status change cuts the wait short
            else:
                self._stop.wait(delay)
            self._wake.clear()
