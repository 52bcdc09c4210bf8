"""Watching the local vLLM server: health, served models, metrics, and the warm-up.

One poller thread (a greenlet under gunicorn's gevent worker) refreshes a snapshot
every ``VLLM_POLL_INTERVAL_S``; ``/readyz`` answers from that snapshot, so a readiness
probe costs nothing and still reflects a dead or hung vLLM within about a second.
A restart of vLLM (seen as it failing its health check, or as a new
``process_start_time_seconds``) clears the warm-up, which then runs again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import requests

from .config import AgentConfig
from .vllm_metrics import VllmSample, parse_vllm_metrics
from .window import CounterWindow, HistogramWindow

log = logging.getLogger("gpufleet.agent.vllm")

WARMUP_PROMPT = "Hello"


@dataclass
class VllmSnapshot:
    polled_at: float = 0.0  # monotonic time the last poll finished; 0 = never
    healthy: bool = False
    health_detail: str = "not polled yet"
    models: list[str] = field(default_factory=list)
    model_listed: bool = False
    model_detail: str = "not polled yet"
    warmed: bool = False
    warmup_detail: str = "not run yet"
    sample: VllmSample | None = None
    version: str | None = None
    epoch: int = 0  # bumped on every (re)start of vLLM that the agent notices


class VllmMonitor:
    def __init__(self, config: AgentConfig, clock=time.monotonic, wall=time.time):
        self.config = config
        self._clock = clock
        self._wall = wall
        self._session = requests.Session()
        self._warmup_session = requests.Session()
        self._lock = threading.Lock()
        self.snapshot = VllmSnapshot()
        self._process_start: float | None = None
        self._was_healthy = False
        self._version_epoch = -1
        self._warmup_running = False
        self._warmup_failures = 0
        self._next_warmup_at = 0.0
        self.ttft = HistogramWindow(config.metrics_window_s)
        self.ttft_scaling = HistogramWindow(config.scaling_ttft_window_s)
        self.e2e = HistogramWindow(config.metrics_window_s)
        self.requests = CounterWindow(config.metrics_window_s)
        self.prefix_queries = CounterWindow(config.metrics_window_s)
        self.prefix_hits = CounterWindow(config.metrics_window_s)
        self.on_change = None  # called (no args) when the local readiness may have changed
        self._stop = threading.Event()

    # -- HTTP helpers ------------------------------------------------------------------

    def _headers(self) -> dict:
        key = self.config.vllm_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _get(self, path: str, *, auth: bool = False) -> requests.Response:
        return self._session.get(self.config.vllm_base_url + path, timeout=self.config.vllm_timeout_s,
                                 headers=self._headers() if auth else None)

    # -- the poll ----------------------------------------------------------------------

    def poll_once(self) -> VllmSnapshot:
        snap = self.snapshot
        before = (snap.healthy, snap.model_listed, snap.warmed)
        healthy, detail = self._check_health()
        if not healthy:
            if self._was_healthy:
                log.warning("vLLM at %s is not healthy any more (%s)", self.config.vllm_base_url, detail)
            self._forget_warmup("vLLM not healthy")
            snap.healthy, snap.health_detail = False, detail
            snap.model_listed, snap.model_detail = False, "vLLM not healthy"
            snap.sample = None
        else:
            if not self._was_healthy:
                log.info("vLLM at %s answers /health", self.config.vllm_base_url)
            snap.healthy, snap.health_detail = True, "ok"
            self._check_models(snap)
            self._read_metrics(snap)
            if self._version_epoch != snap.epoch:  # once per vLLM process; older ones have no /version
                snap.version = self._read_version()
                self._version_epoch = snap.epoch
        self._was_healthy = healthy
        snap.polled_at = self._clock()
        if snap.healthy and snap.model_listed and not snap.warmed:
            self._maybe_start_warmup()
        if (snap.healthy, snap.model_listed, snap.warmed) != before and self.on_change:
            self.on_change()
        return snap

    def _check_health(self) -> tuple[bool, str]:
        try:
            resp = self._get("/health")
        except requests.Timeout:
            return False, f"/health did not answer within {self.config.vllm_timeout_s:g}s"
        except requests.RequestException as exc:
            return False, f"/health unreachable ({type(exc).__name__})"
        if resp.status_code != 200:
            return False, f"/health answered {resp.status_code}"
        return True, "ok"

    def _check_models(self, snap: VllmSnapshot) -> None:
        try:
            resp = self._get("/v1/models", auth=True)
            if resp.status_code != 200:
                snap.model_listed, snap.model_detail = False, f"/v1/models answered {resp.status_code}"
                return
            ids = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
        except (requests.RequestException, ValueError, AttributeError) as exc:
            snap.model_listed, snap.model_detail = False, f"/v1/models failed ({type(exc).__name__})"
            return
        snap.models = [i for i in ids if isinstance(i, str)]
        snap.model_listed = self.config.model_id in snap.models
        snap.model_detail = "ok" if snap.model_listed else (
            f"{self.config.model_id!r} not among the served models {snap.models}")

    def _read_metrics(self, snap: VllmSnapshot) -> None:
        try:
            resp = self._get("/metrics")
            if resp.status_code != 200:
                return
            sample = parse_vllm_metrics(resp.text)
        except (requests.RequestException, ValueError) as exc:
            log.debug("reading vLLM /metrics failed: %s", exc)
            return
        self.observe_sample(sample)

    def observe_sample(self, sample: VllmSample) -> None:
        """Take in one scrape of vLLM's metrics: windows, gauges, and restart detection."""
        snap = self.snapshot
        start = sample.process_start_time
        if start is not None and self._process_start is not None and abs(start - self._process_start) > 0.5:
            log.warning("vLLM restarted (process_start_time_seconds changed): warming up again")
            self._forget_warmup("vLLM restarted")
        if start is not None:
            self._process_start = start
        now = self._clock()
        if sample.ttft is not None:
            self.ttft.observe(now, sample.ttft)
            self.ttft_scaling.observe(now, sample.ttft)
        if sample.e2e is not None:
            self.e2e.observe(now, sample.e2e)
        if sample.request_success_total is not None:
            self.requests.observe(now, sample.request_success_total)
        elif sample.e2e is not None:
            self.requests.observe(now, sample.e2e.count)
        if sample.prefix_cache_queries is not None and sample.prefix_cache_hits is not None:
            self.prefix_queries.observe(now, sample.prefix_cache_queries)
            self.prefix_hits.observe(now, sample.prefix_cache_hits)
        snap.sample = sample

    def prefix_cache_hit_ratio(self) -> float:
        """Prompt tokens found in vLLM's prefix cache over those looked up, in the window (0 without any)."""
        queried = self.prefix_queries.rate()
        return min(self.prefix_hits.rate() / queried, 1.0) if queried > 0 else 0.0

    def _read_version(self) -> str | None:
        try:
            resp = self._get("/version")
            if resp.status_code == 200:
                version = resp.json().get("version")
                return str(version) if version else None
        except (requests.RequestException, ValueError, AttributeError):
            pass
        return None

    # -- warm-up -----------------------------------------------------------------------

    def _forget_warmup(self, why: str) -> None:
        snap = self.snapshot
        snap.epoch += 1
        snap.warmed, snap.warmup_detail = False, f"pending ({why})"
        snap.version = None
        self._warmup_failures = 0
        self._next_warmup_at = 0.0

    def _maybe_start_warmup(self) -> None:
        with self._lock:
            if self._warmup_running or self._clock() < self._next_warmup_at:
                return
            self._warmup_running = True
        epoch = self.snapshot.epoch
        self.snapshot.warmup_detail = "running"
        threading.Thread(target=self._warmup, args=(epoch,), name="vllm-warmup", daemon=True).start()

    def warmup_once(self) -> tuple[bool, str]:
        """One tiny completion (1 token); chat as a fallback for chat-only servers."""
        body = {"model": self.config.model_id, "max_tokens": 1, "temperature": 0}
        attempts = [("/v1/completions", {**body, "prompt": WARMUP_PROMPT}),
                    ("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": WARMUP_PROMPT}]})]
        detail = ""
        for path, payload in attempts:
            try:
                resp = self._warmup_session.post(self.config.vllm_base_url + path, json=payload,
                                                 headers=self._headers(), timeout=self.config.warmup_timeout_s)
            except requests.RequestException as exc:
                return False, f"{path} failed ({type(exc).__name__})"
            if resp.status_code == 200:
                return True, f"ok ({path})"
            detail = f"{path} answered {resp.status_code}"
            if resp.status_code not in (400, 404, 405):
                break
        return False, detail

    def _warmup(self, epoch: int) -> None:
        started = self._clock()
        try:
            ok, detail = self.warmup_once()
        finally:
            with self._lock:
                self._warmup_running = False
        snap = self.snapshot
        if snap.epoch != epoch:
            return  # vLLM restarted meanwhile: this result says nothing about the new process
        if ok:
            log.info("warm-up completion succeeded in %.0f ms", (self._clock() - started) * 1000)
            snap.warmed, snap.warmup_detail = True, "ok"
            self._warmup_failures = 0
            if self.on_change:
                self.on_change()
        else:
            self._warmup_failures += 1
            delay = min(10.0, 0.5 * 2 ** min(self._warmup_failures, 5))
            self._next_warmup_at = self._clock() + delay
            snap.warmup_detail = f"failed: {detail}; retrying in {delay:.1f}s"
            log.warning("warm-up completion failed: %s", detail)

    # -- loop --------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("polling vLLM failed")
            self._stop.wait(max(0.0, self.config.vllm_poll_interval_s - (self._clock() - started)))

    def stop(self) -> None:
        self._stop.set()

    def stale(self) -> bool:
        """The snapshot is too old to trust (the poller is stuck or never ran)."""
        limit = self.config.vllm_poll_interval_s + 3 * self.config.vllm_timeout_s + 1.0
        return self.snapshot.polled_at == 0.0 or self._clock() - self.snapshot.polled_at > limit

    def inflight(self) -> int:
        sample = self.snapshot.sample
        return 0 if sample is None else int(sample.running + sample.waiting)
