"""The scaling loop (run by the leading reconciler): per model, ``scaling.decide`` on the
routable workers' load, then store the decision and actuate it.

Actuation (``GPUFLEET_SCALING_ACTUATOR``):
- ``log`` (default): advisory — decisions are logged, stored and exported, nothing is
  drained or started (a drained worker nobody removes would be lost capacity);
- ``webhook``: POST the decision as JSON to ``GPUFLEET_SCALING_WEBHOOK_URL``;
- ``command``: run ``GPUFLEET_SCALING_COMMAND`` (e.g. an ``ansible-playbook``) with the
  decision as JSON on stdin and in ``GPUFLEET_SCALE_*`` variables.
With ``webhook`` and ``command`` a scale-down first drains the least-loaded worker.
Actuation runs in a background thread, one at a time per model; the outcome is written
back to the decision's row.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import threading

import urllib3

from gpufleet.controlplane import store
from gpufleet.controlplane.routability import assess_row
from gpufleet.controlplane.scaling import Decision, ModelLoad, ScalingSettings, ScalingState, WorkerLoad, decide

log = logging.getLogger("gpufleet.scaling")


def decision_json(decision: Decision, decision_id: int | None = None) -> dict:
    return {"decision_id": decision_id, "model_id": decision.model_id,
            "current_replicas": decision.current_replicas, "desired_replicas": decision.desired_replicas,
            "action": decision.action, "reason": decision.reason, "drain_worker_id": decision.drain_worker_id,
            "inputs": decision.inputs}


def actuate(settings: ScalingSettings, decision: Decision, decision_id: int | None) -> tuple[bool, str | None]:
    payload = decision_json(decision, decision_id)
    if settings.actuator == "log":
        log.info("scaling (advisory): %s %s → %d replicas: %s", decision.model_id, decision.action,
                 decision.desired_replicas, decision.reason)
        return True, None
    if settings.actuator == "webhook":
        try:
            resp = urllib3.request("POST", settings.webhook_url, body=json.dumps(payload).encode(),
                                   headers={"Content-Type": "application/json"},
                                   timeout=urllib3.Timeout(connect=5, read=30), retries=False)
        except urllib3.exceptions.HTTPError as exc:
            return False, f"webhook: {exc}"[:500]
        return (200 <= resp.status < 300), (None if resp.status < 300 else f"webhook answered HTTP {resp.status}")
    env = dict(os.environ)
    env.update({"GPUFLEET_SCALE_MODEL": decision.model_id, "GPUFLEET_SCALE_ACTION": decision.action,
                "GPUFLEET_SCALE_CURRENT": str(decision.current_replicas),
                "GPUFLEET_SCALE_DESIRED": str(decision.desired_replicas),
                "GPUFLEET_SCALE_DRAIN_WORKER": decision.drain_worker_id or ""})
    # the daemon's own secrets are not the command's business
    for name in ("GPUFLEET_DATABASE_URL", "GPUFLEET_REDIS_URL", "GPUFLEET_ADMIN_TOKEN"):
        env.pop(name, None)
    try:
        proc = subprocess.run(shlex.split(settings.command), input=json.dumps(payload), text=True, env=env,
                              capture_output=True, timeout=3600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"command: {exc}"[:500]
    if proc.returncode != 0:
        return False, f"command exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
    return True, None


class Scaler:
    def __init__(self, settings: ScalingSettings, db, publisher, stale_after_s: float | None = None):
        self.settings = settings
        self.db = db
        self.publisher = publisher
        self.stale_after_s = stale_after_s if stale_after_s is not None else publisher.heartbeat_interval_s * 3
        self.states: dict[str, ScalingState] = {}
        self._last_stored: dict[str, tuple] = {}
        self._busy: set[str] = set()
        self._next_run = 0.0

    def restore(self) -> None:
        """A new leader picks up the cool-downs from the stored decisions."""
        with self.db.cursor() as cur:
            cur.execute("""SELECT model_id,
                                  max(extract(epoch FROM decided_at)) FILTER (WHERE action = 'scale_up') AS up,
                                  max(extract(epoch FROM decided_at)) FILTER (WHERE action = 'scale_down') AS down
                           FROM scaling_decisions GROUP BY model_id""")
            for row in cur.fetchall():
                self.states[row["model_id"]] = ScalingState(
                    float(row["up"]) if row["up"] is not None else None,
                    float(row["down"]) if row["down"] is not None else None, None)
        self._next_run = 0.0

    def maybe_run(self, now: float) -> list[Decision]:
        if now < self._next_run:
            return []
        self._next_run = now + self.settings.interval_s
        return self.run_once(now)

    def loads(self) -> list[ModelLoad]:
        with self.db.cursor() as cur:
            rows = store.list_workers(cur)
        per_model: dict[str, list[WorkerLoad]] = {}
        for row in rows:
            if row["retired_at"] is not None:
                continue
            per_model.setdefault(row["model_id"], [])
            if assess_row(row, self.stale_after_s).routable:
                per_model[row["model_id"]].append(WorkerLoad(row["worker_id"], row["queue_depth"], row["running"],
                                                             row["gpu_util"], row["ttft_p95_ms"]))
        return [ModelLoad(m, tuple(ws)) for m, ws in sorted(per_model.items())]

    def run_once(self, now: float) -> list[Decision]:
        decisions = []
        for load in self.loads():
            if load.model_id in self._busy:
                continue  # the previous actuation for this model is still running
            decision, state = decide(load, self.states.get(load.model_id, ScalingState()), self.settings, now)
            self.states[load.model_id] = state
            decisions.append(decision)
            signature = (decision.action, decision.current_replicas, decision.desired_replicas)
            if decision.action == "none" and self._last_stored.get(load.model_id) == signature:
                continue
            self._last_stored[load.model_id] = signature
            decision_id = self._store(decision)
            if decision.action == "none":
                continue
            log.info("scaling %s: %s %d → %d (%s)%s", decision.model_id, decision.action,
                     decision.current_replicas, decision.desired_replicas, decision.reason,
                     f", draining {decision.drain_worker_id}" if decision.drain_worker_id else "")
            if decision.action == "scale_down" and decision.drain_worker_id and self.settings.actuator != "log":
                self._drain(decision)
            self._busy.add(decision.model_id)
            threading.Thread(target=self._actuate, args=(decision, decision_id), daemon=True,
                             name=f"actuate-{decision.model_id}").start()
        return decisions

    def _store(self, decision: Decision) -> int:
        with self.db.cursor() as cur:
            cur.execute("""INSERT INTO scaling_decisions (model_id, current_replicas, desired_replicas, action,
                                                          reason, inputs, drain_worker_id, actuator)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING decision_id""",
                        (decision.model_id, decision.current_replicas, decision.desired_replicas, decision.action,
                         decision.reason, json.dumps(decision.inputs), decision.drain_worker_id,
                         self.settings.actuator if decision.action != "none" else None))
            return cur.fetchone()["decision_id"]

    def _drain(self, decision: Decision) -> None:
        with self.db.cursor() as cur:
            row = store.set_desired_status(cur, decision.drain_worker_id, "draining")
        if row is not None:
            self.publisher.unpublish_worker(row["worker_id"], row["model_id"], "draining")

    def _actuate(self, decision: Decision, decision_id: int) -> None:
        try:
            ok, error = actuate(self.settings, decision, decision_id)
        except Exception as exc:  # noqa: BLE001 - recorded on the decision
            ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
        finally:
            self._busy.discard(decision.model_id)
        if not ok:
            log.error("scaling actuation for %s failed: %s", decision.model_id, error)
        try:
            with self.db.cursor() as cur:
                cur.execute("UPDATE scaling_decisions SET actuation_ok = %s, actuation_error = %s "
                            "WHERE decision_id = %s", (ok, error, decision_id))
        except Exception:  # noqa: BLE001
            log.exception("could not record the actuation outcome")
