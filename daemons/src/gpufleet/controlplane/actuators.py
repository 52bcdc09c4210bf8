"""Scaling actuators: tell the outside world about a decision (``GPUFLEET_SCALING_ACTUATOR``).

- ``log``: advisory, only logged (the loop drains nothing for it);
- ``webhook``: POST the decision JSON to ``GPUFLEET_SCALING_WEBHOOK_URL``; 2xx is success;
- ``command``: run ``GPUFLEET_SCALING_COMMAND`` (split like a shell line, no shell) with
  the decision JSON on stdin and in ``GPUFLEET_SCALE_*`` variables; exit 0 is success.

Each call is bounded by ``actuation_timeout_s``. The command runs in a session of its own
so that, at the timeout or when the reconciler stops, its whole process group is killed
(an ``ansible-playbook`` leaves children behind otherwise). Only the last
``OUTPUT_TAIL_BYTES`` of its stdout and stderr are kept, read from temporary files, so a
chatty command costs no memory and cannot block on a full pipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import urllib3

from gpufleet.controlplane.scaling import Decision, ScalingSettings

log = logging.getLogger("gpufleet.scaling")

OUTPUT_TAIL_BYTES = 4000
# after SIGTERM to the group, the command gets this long before SIGKILL
KILL_GRACE_S = 3.0
# the daemon's own secrets are not the command's business
_SECRET_ENV = ("GPUFLEET_DATABASE_URL", "GPUFLEET_REDIS_URL", "GPUFLEET_ADMIN_TOKEN", "GPUFLEET_ADMIN_TOKEN_FILE")


@dataclass(frozen=True)
class Outcome:
    outcome: str  # ok | failed | timed_out | advisory
    error: str | None = None
    stdout: str | None = None
    stderr: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("ok", "advisory")


def decision_json(decision: Decision, decision_id: int | None = None) -> dict:
    return {"decision_id": decision_id, "model_id": decision.model_id,
            "current_replicas": decision.current_replicas, "desired_replicas": decision.desired_replicas,
            "action": decision.action, "reason": decision.reason, "drain_worker_id": decision.drain_worker_id,
            "inputs": decision.inputs}


def actuate(settings: ScalingSettings, decision: Decision, decision_id: int | None, *,
            stop: threading.Event | None = None,
            on_start: Callable[[int], None] | None = None) -> Outcome:
    """Run the configured actuator for one decision. ``on_start(pgid)`` is called once the
    command runs (to record its process group); ``stop`` interrupts a running command."""
    payload = decision_json(decision, decision_id)
    if settings.actuator == "log":
        log.info("scaling (advisory, log actuator; nothing is drained or started): %s %s %d → %d: %s%s",
                 decision.model_id, decision.action, decision.current_replicas, decision.desired_replicas,
                 decision.reason, f" (would drain {decision.drain_worker_id})" if decision.drain_worker_id else "")
        return Outcome("advisory")
    if settings.actuator == "webhook":
        return _webhook(settings, payload)
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    env.update({"GPUFLEET_SCALE_MODEL": decision.model_id, "GPUFLEET_SCALE_ACTION": decision.action,
                "GPUFLEET_SCALE_CURRENT": str(decision.current_replicas),
                "GPUFLEET_SCALE_DESIRED": str(decision.desired_replicas),
                "GPUFLEET_SCALE_DRAIN_WORKER": decision.drain_worker_id or "",
                "GPUFLEET_SCALE_DECISION_ID": "" if decision_id is None else str(decision_id)})
    return run_command(settings.command_argv, json.dumps(payload).encode(), env, settings.actuation_timeout_s,
                       stop=stop, on_start=on_start)


def _webhook(settings: ScalingSettings, payload: dict) -> Outcome:
    timeout = settings.actuation_timeout_s
    try:
        resp = urllib3.request("POST", settings.webhook_url, body=json.dumps(payload).encode(),
                               headers={"Content-Type": "application/json"}, preload_content=False,
                               timeout=urllib3.Timeout(connect=min(5.0, timeout), read=timeout),
                               retries=False, redirect=False)
        try:
            body = resp.read(OUTPUT_TAIL_BYTES).decode("utf-8", "replace")
        finally:
            resp.release_conn()
    except urllib3.exceptions.NewConnectionError as exc:  # a subclass of the timeout errors
        return Outcome("failed", f"webhook: cannot connect: {exc}"[:500])
    except urllib3.exceptions.TimeoutError as exc:
        return Outcome("timed_out", f"webhook: no answer within {timeout:g}s ({type(exc).__name__})")
    except urllib3.exceptions.HTTPError as exc:
        return Outcome("failed", f"webhook: {type(exc).__name__}: {exc}"[:500])
    if 200 <= resp.status < 300:
        return Outcome("ok", None, body or None)
    return Outcome("failed", f"webhook answered HTTP {resp.status}", body or None)


def run_command(argv: list[str], stdin: bytes, env: dict, timeout_s: float, *,
                stop: threading.Event | None = None, on_start: Callable[[int], None] | None = None) -> Outcome:
    with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        inp.write(stdin)
        inp.seek(0)
        try:
            proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err, env=env, start_new_session=True)
        except OSError as exc:
            return Outcome("failed", f"command: cannot start {argv[0]!r}: {exc.strerror or exc}")
        if on_start is not None:
            try:
                on_start(proc.pid)
            except Exception:  # noqa: BLE001 - recording the group must not orphan the command
                log.exception("could not record the command's process group")
        deadline = time.monotonic() + timeout_s
        interrupted = timed_out = False
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    interrupted = True
                elif time.monotonic() >= deadline:
                    timed_out = True
                else:
                    continue
            kill_group(proc.pid, proc)
            break
        stdout, stderr = _tail(out), _tail(err)
    if timed_out:
        return Outcome("timed_out", f"command ran over {timeout_s:g}s; its process group was killed",
                       stdout, stderr)
    if interrupted:
        return Outcome("failed", "command interrupted: the reconciler stopped; its process group was killed",
                       stdout, stderr)
    if proc.returncode != 0:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited {proc.returncode}")
        last = (stderr or "").strip().splitlines()[-1:] or [""]
        return Outcome("failed", f"command {how}" + (f": {last[0][-300:]}" if last[0] else ""), stdout, stderr)
    return Outcome("ok", None, stdout, stderr)


def kill_group(pgid: int, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group, SIGKILL what is left after a grace period."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline:
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        else:
            time.sleep(0.1)
        if not group_alive(pgid):
            break
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(f) -> str | None:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - OUTPUT_TAIL_BYTES))
    data = f.read()
    return data.decode("utf-8", "replace") if data else None
