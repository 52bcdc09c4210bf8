"""SQL of the scaling loop: decisions with their steps, the policy's state per model and
the leader's published settings. Each function takes a cursor, so the caller decides the
transaction (``Scaler.record`` writes a decision, the new state and the drain in one)."""

from __future__ import annotations

import json

from gpufleet.controlplane.scaling import Decision, ScalingSettings, ScalingState

UNFINISHED = ("pending", "draining", "actuating")
_STATE_FIELDS = ("last_scale_up_at", "last_scale_down_at", "low_since", "target_replicas", "backoff_action",
                 "backoff_until")


def load_states(cur) -> dict[str, ScalingState]:
    cur.execute(f"SELECT model_id, {', '.join(_STATE_FIELDS)} FROM scaling_state")
    return {r["model_id"]: ScalingState(**{k: r[k] for k in _STATE_FIELDS}) for r in cur.fetchall()}


def save_state(cur, model_id: str, state: ScalingState) -> None:
    values = [getattr(state, k) for k in _STATE_FIELDS]
    cur.execute(f"""INSERT INTO scaling_state (model_id, {', '.join(_STATE_FIELDS)}, updated_at)
                    VALUES (%s, {', '.join(['%s'] * len(_STATE_FIELDS))}, now())
                    ON CONFLICT (model_id) DO UPDATE SET
                        {', '.join(f'{k} = EXCLUDED.{k}' for k in _STATE_FIELDS)}, updated_at = now()""",
                (model_id, *values))


def set_backoff(cur, model_id: str, action: str, until: float) -> None:
    cur.execute("""INSERT INTO scaling_state (model_id, backoff_action, backoff_until) VALUES (%s, %s, %s)
                   ON CONFLICT (model_id) DO UPDATE SET backoff_action = EXCLUDED.backoff_action,
                       backoff_until = EXCLUDED.backoff_until, target_replicas = NULL, updated_at = now()""",
                (model_id, action, until))


def record_none(cur, decision: Decision) -> int:
    """A "none" decision refreshes the model's latest row when that is a "none" too (so
    the shown reason and inputs are always the last ones), else starts a new row."""
    cur.execute("""SELECT decision_id, action FROM scaling_decisions WHERE model_id = %s
                   ORDER BY decided_at DESC, decision_id DESC LIMIT 1 FOR UPDATE""", (decision.model_id,))
    last = cur.fetchone()
    if last is not None and last["action"] == "none":
        cur.execute("""UPDATE scaling_decisions SET decided_at = now(), current_replicas = %s,
                           desired_replicas = %s, reason = %s, inputs = %s, repeats = repeats + 1
                       WHERE decision_id = %s""",
                    (decision.current_replicas, decision.desired_replicas, decision.reason,
                     json.dumps(decision.inputs), last["decision_id"]))
        return last["decision_id"]
    return insert_decision(cur, decision, None, None)


def insert_decision(cur, decision: Decision, actuator: str | None, step: str | None, *,
                    deadline_s: float | None = None, owner: str | None = None) -> int:
    outcome = "advisory" if step == "advisory" else None
    cur.execute("""INSERT INTO scaling_decisions (model_id, current_replicas, desired_replicas, action, reason,
                                                  inputs, drain_worker_id, actuator, step, step_changed_at,
                                                  deadline_at, owner, outcome, actuation_ok)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s::text IS NULL THEN NULL ELSE now() END,
                           now() + make_interval(secs => %s), %s, %s, %s)
                   RETURNING decision_id""",
                (decision.model_id, decision.current_replicas, decision.desired_replicas, decision.action,
                 decision.reason, json.dumps(decision.inputs), decision.drain_worker_id, actuator, step, step,
                 deadline_s, owner, outcome, True if outcome else None))
    return cur.fetchone()["decision_id"]


def get_decision(cur, decision_id: int, *, for_update: bool = False):
    cur.execute(f"""SELECT *, extract(epoch FROM deadline_at - now())::float8 AS deadline_in_s
                    FROM scaling_decisions WHERE decision_id = %s {"FOR UPDATE" if for_update else ""}""",
                (decision_id,))
    return cur.fetchone()


def unfinished(cur):
    cur.execute("""SELECT decision_id, model_id, step FROM scaling_decisions WHERE step IN %s
                   ORDER BY decision_id""", (UNFINISHED,))
    return cur.fetchall()


def set_step(cur, decision_id: int, step: str, owner: str, *, deadline_s: float | None = None,
             started: bool = False) -> None:
    cur.execute("""UPDATE scaling_decisions SET step = %s, step_changed_at = now(), owner = %s,
                       deadline_at = CASE WHEN %s::float8 IS NULL THEN deadline_at
                                          ELSE now() + make_interval(secs => %s) END,
                       actuation_started_at = CASE WHEN %s THEN now() ELSE actuation_started_at END,
                       command_pgid = CASE WHEN %s THEN NULL ELSE command_pgid END
                   WHERE decision_id = %s""",
                (step, owner, deadline_s, deadline_s, started, started, decision_id))


def set_owner(cur, decision_id: int, owner: str) -> None:
    cur.execute("UPDATE scaling_decisions SET owner = %s WHERE decision_id = %s", (owner, decision_id))


def set_command_pgid(cur, decision_id: int, pgid: int) -> None:
    cur.execute("UPDATE scaling_decisions SET command_pgid = %s WHERE decision_id = %s", (pgid, decision_id))


def set_drain_inflight(cur, decision_id: int, inflight: int | None) -> None:
    cur.execute("UPDATE scaling_decisions SET drain_inflight = %s WHERE decision_id = %s", (inflight, decision_id))


def finish(cur, decision_id: int, outcome: str, error: str | None, stdout: str | None = None,
           stderr: str | None = None, undrained: bool | None = None) -> None:
    ok = outcome in ("ok", "advisory")
    cur.execute("""UPDATE scaling_decisions SET step = %s, step_changed_at = now(), outcome = %s,
                       actuation_ok = %s, actuation_error = %s, actuation_stdout = %s, actuation_stderr = %s,
                       actuation_finished_at = CASE WHEN actuation_started_at IS NULL THEN NULL ELSE now() END,
                       undrained = %s, deadline_at = NULL
                   WHERE decision_id = %s""",
                ("done" if ok else "failed", outcome, ok, error, stdout, stderr, undrained, decision_id))


def undrain(cur, worker_id: str) -> bool:
    """Return a worker the scaling loop drained, unless an operator changed it since."""
    cur.execute("""UPDATE workers SET desired_status = 'ready' WHERE worker_id = %s AND desired_status = 'draining'
                   RETURNING worker_id""", (worker_id,))
    return cur.fetchone() is not None


def drain(cur, worker_id: str) -> bool:
    cur.execute("""UPDATE workers SET desired_status = 'draining' WHERE worker_id = %s RETURNING worker_id""",
                (worker_id,))
    return cur.fetchone() is not None


def publish_settings(cur, reconciler: str, settings: ScalingSettings) -> None:
    cur.execute("""INSERT INTO scaling_settings (singleton, reconciler, settings, published_at)
                   VALUES (true, %s, %s, now())
                   ON CONFLICT (singleton) DO UPDATE SET reconciler = EXCLUDED.reconciler,
                       settings = EXCLUDED.settings, published_at = now()""",
                (reconciler, json.dumps(settings.as_dict())))
