"""A throw-away Prometheus (Debian's package binary) in a temp dir on a free port, and the
dashboard's queries as Prometheus runs them."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import requests

from .procs import Daemon, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "rules" / "gpufleet.rules.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "gpufleet.json"


def binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: run `make deps` (installs Debian's prometheus package)")
    return found


class PrometheusServer:
    """``prometheus`` scraping what the control plane's HTTP SD lists, every second."""

    def __init__(self, sd_url: str, sd_token: str, *, interval_s: float = 1.0, port: int | None = None):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gpufleet-prometheus-"))
        token_file = self.dir / "sd-token"
        token_file.write_text(sd_token)
        token_file.chmod(0o600)
        config = {
            "global": {"scrape_interval": f"{interval_s:g}s", "scrape_timeout": f"{interval_s:g}s",
                       "evaluation_interval": f"{interval_s:g}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "gpufleet",
                "http_sd_configs": [{"url": sd_url, "refresh_interval": f"{interval_s:g}s",
                                     # type explicitly: 2.42 sends SD requests without "Bearer" otherwise
                                     "authorization": {"type": "Bearer", "credentials_file": str(token_file)}}],
            }],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.daemon = Daemon(f"prometheus-{self.port}", [
            binary("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h", "--log.level=warn"], cwd=str(self.dir))
        wait_until(lambda: requests.get(self.url + "/-/ready", timeout=1).ok, timeout=30,
                   what="prometheus to be ready")
        return self

    def targets(self) -> list[dict]:
        return requests.get(self.url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

    def query(self, expr: str) -> list[dict]:
        body = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        if body["status"] != "success":
            raise AssertionError(f"{expr}: {body}")
        return body["data"]["result"]

    def cleanup(self) -> None:
        if self.daemon:
            self.daemon.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dash: dict, model: str = ".*", rate_interval: str = "1m"):
    """(panel title, refId, PromQL) of every panel target, with the dashboard's variables
    replaced as Grafana would (``$model`` by its value, ``$__rate_interval``)."""
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\$__rate_interval\b", rate_interval, target["expr"])
            expr = re.sub(r"\$\{?model\}?", model, expr)
            yield panel["title"], target["refId"], expr
