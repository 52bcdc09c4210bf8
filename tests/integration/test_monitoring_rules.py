"""gpufleet's Prometheus rules pass ``promtool check rules``, and ``promtool test rules``
proves every alert both ways: it fires on a crafted series and stays silent on a healthy one."""

import subprocess

import yaml

from support.prometheus import REPO, RULES, binary

TESTS = sorted((REPO / "monitoring" / "tests").glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_rules_are_valid():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", *map(str, TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    fires, silent = set(), set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"
    assert len(alerts) >= 15


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section():
    docs = (REPO / "docs" / "monitoring.md").read_text()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            anchor = rule["annotations"]["runbook"].split("#")[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert']}\n" in docs, f"docs/monitoring.md has no runbook for {rule['alert']}"
