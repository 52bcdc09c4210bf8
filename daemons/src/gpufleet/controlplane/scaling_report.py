"""What the scaling loop shows: ``GET /v1/admin/scaling`` and the scaling metrics, both
read from PostgreSQL (so every control-plane replica reports the leader's view)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from gpufleet.controlplane.scaling import ScalingSettings

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


def _iso(value):
    return value.isoformat() if value is not None else None


def decision_json(r) -> dict:
    duration = None
    if r["actuation_started_at"] is not None and r["actuation_finished_at"] is not None:
        duration = round((r["actuation_finished_at"] - r["actuation_started_at"]).total_seconds(), 3)
    return {"decision_id": r["decision_id"], "model_id": r["model_id"], "decided_at": _iso(r["decided_at"]),
            "current_replicas": r["current_replicas"], "desired_replicas": r["desired_replicas"],
            "action": r["action"], "reason": r["reason"], "inputs": r["inputs"], "repeats": r["repeats"],
            "drain_worker_id": r["drain_worker_id"], "actuator": r["actuator"],
            "advisory": r["actuator"] == "log", "step": r["step"], "step_changed_at": _iso(r["step_changed_at"]),
            "deadline_at": _iso(r["deadline_at"]), "owner": r["owner"], "drain_inflight": r["drain_inflight"],
            "outcome": r["outcome"], "actuation_ok": r["actuation_ok"], "actuation_error": r["actuation_error"],
            "actuation_started_at": _iso(r["actuation_started_at"]),
            "actuation_finished_at": _iso(r["actuation_finished_at"]), "actuation_duration_s": duration,
            "actuation_stdout": r["actuation_stdout"], "actuation_stderr": r["actuation_stderr"],
            "undrained": r["undrained"]}


def report(cur, model_id: str | None, limit: int, own_settings: ScalingSettings) -> dict:
    """Decisions (newest first), the latest per model, and the settings of the leading
    reconciler as it published them (this process's own only until one has)."""
    cur.execute("""SELECT * FROM scaling_decisions WHERE (%s::text IS NULL OR model_id = %s)
                   ORDER BY decided_at DESC, decision_id DESC LIMIT %s""", (model_id, model_id, limit))
    rows = cur.fetchall()
    cur.execute("""SELECT DISTINCT ON (model_id) * FROM scaling_decisions WHERE (%s::text IS NULL OR model_id = %s)
                   ORDER BY model_id, decided_at DESC, decision_id DESC""", (model_id, model_id))
    latest = cur.fetchall()
    cur.execute("SELECT reconciler, settings, published_at FROM scaling_settings")
    published = cur.fetchone()
    if published is not None:
        settings, source = published["settings"], {"reconciler": published["reconciler"],
                                                   "published_at": _iso(published["published_at"])}
    else:
        settings, source = own_settings.as_dict(), {"reconciler": None, "published_at": None,
                                                    "note": "no reconciler has led yet: the control plane's own "
                                                            "settings"}
    return {"enabled": settings["enabled"], "actuator": settings["actuator"],
            "advisory": settings["actuator"] == "log", "settings": settings, "settings_source": source,
            "latest": {r["model_id"]: decision_json(r) for r in latest},
            "decisions": [decision_json(r) for r in rows]}


def metric_families(cur):
    """Counters of decisions and actuations, the latest decision's replicas and step, and
    the actuation durations, per model."""
    decisions = CounterMetricFamily("gpufleet_scaling_decisions", "Scaling decisions by action (advisory "
                                    "ones have actuator=log)", labels=["model_id", "action", "actuator"])
    actuations = CounterMetricFamily("gpufleet_scaling_actuations", "Finished actuations by outcome (ok, failed, "
                                     "timed_out; advisory for the log actuator)",
                                     labels=["model_id", "action", "actuator", "outcome"])
    desired = GaugeMetricFamily("gpufleet_scaling_desired_replicas",
                                "Desired replicas of the latest scaling decision (of any kind)", labels=["model_id"])
    current = GaugeMetricFamily("gpufleet_scaling_current_replicas",
                                "Routable replicas seen by the latest scaling decision", labels=["model_id"])
    decided = GaugeMetricFamily("gpufleet_scaling_last_decision_timestamp_seconds",
                                "Time of the latest scaling decision", labels=["model_id", "action"])
    unfinished = GaugeMetricFamily("gpufleet_scaling_unfinished", "1 while a scale action of the model is "
                                   "unfinished, labelled with its step", labels=["model_id", "step"])
    duration = HistogramMetricFamily("gpufleet_scaling_actuation_duration_seconds",
                                     "Time from the start of an actuation to its outcome", labels=["model_id"])

    cur.execute("""SELECT model_id, action, coalesce(actuator, '') AS actuator, sum(repeats)::bigint AS n
                   FROM scaling_decisions GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""")
    for r in cur.fetchall():
        decisions.add_metric([r["model_id"], r["action"], r["actuator"]], r["n"])
    cur.execute("""SELECT model_id, action, actuator, outcome, count(*) AS n FROM scaling_decisions
                   WHERE outcome IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""")
    for r in cur.fetchall():
        actuations.add_metric([r["model_id"], r["action"], r["actuator"], r["outcome"]], r["n"])
    cur.execute("""SELECT DISTINCT ON (model_id) model_id, desired_replicas, current_replicas, action,
                          extract(epoch FROM decided_at)::float8 AS ts
                   FROM scaling_decisions ORDER BY model_id, decided_at DESC, decision_id DESC""")
    for r in cur.fetchall():
        desired.add_metric([r["model_id"]], r["desired_replicas"])
        current.add_metric([r["model_id"]], r["current_replicas"])
        decided.add_metric([r["model_id"], r["action"]], r["ts"])
    cur.execute("SELECT model_id, step FROM scaling_decisions WHERE step IN ('pending', 'draining', 'actuating')")
    for r in cur.fetchall():
        unfinished.add_metric([r["model_id"], r["step"]], 1)
    buckets = ", ".join(f"count(*) FILTER (WHERE d <= {b})" for b in DURATION_BUCKETS)
    cur.execute(f"""SELECT model_id, count(*) AS n, sum(d) AS total, ARRAY[{buckets}] AS le FROM (
                        SELECT model_id, extract(epoch FROM actuation_finished_at - actuation_started_at) AS d
                        FROM scaling_decisions WHERE actuation_finished_at IS NOT NULL) t
                    GROUP BY model_id ORDER BY model_id""")
    for r in cur.fetchall():
        cumulative = [(f"{b:g}", n) for b, n in zip(DURATION_BUCKETS, r["le"], strict=True)]
        duration.add_metric([r["model_id"]], [*cumulative, ("+Inf", r["n"])], float(r["total"] or 0.0))
    return [decisions, actuations, desired, current, decided, unfinished, duration]
