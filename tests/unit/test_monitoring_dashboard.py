"""The Grafana dashboard holds what Grafana needs to import it (the queries themselves are
run against a live fleet in tests/integration/test_monitoring_live.py)."""

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "monitoring" / "grafana" / "gpufleet.json"


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_top_level_fields_grafana_imports():
    dash = load()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert dash["id"] is None  # an import creates a new dashboard rather than overwriting one by id
    assert {"from", "to"} <= set(dash["time"])


def test_datasource_and_model_variables():
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
    assert "label_values(" in model["definition"] and model["includeAll"] and model["allValue"] == ".*"


def test_every_panel_has_an_id_a_position_and_targets_on_the_datasource_variable():
    panels = load()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells = set()
    for p in panels:
        pos = p["gridPos"]
        assert set(pos) == {"h", "w", "x", "y"} and pos["w"] >= 1 and pos["h"] >= 1 and pos["x"] + pos["w"] <= 24
        for dx in range(pos["w"]):
            for dy in range(pos["h"]):
                cell = (pos["x"] + dx, pos["y"] + dy)
                assert cell not in cells, f"panel {p['title']!r} overlaps another"
                cells.add(cell)
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat") and p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"


def test_panels_the_issue_asks_for():
    titles = " | ".join(p["title"].lower() for p in load()["panels"])
    for words in ("routable workers", "request rate", "5xx ratio", "ttft", "tokens/s", "queue", "running",
                  "kv-cache", "gpu utilisation", "breaker", "retries", "redis", "heartbeats", "reconcile cycle",
                  "scaling", "workers by health", "before the worker", "as clients see it", "attempts per request",
                  "per api key"):
        assert words in titles, words
