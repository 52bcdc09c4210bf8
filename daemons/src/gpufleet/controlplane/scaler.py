"""The scaling loop, run by the leading reconciler: per model, ``scaling.decide`` on the
routable workers' load, then the decision's steps, each persisted before it starts.

scale_down: the decision row, the new policy state and the drain of the chosen worker are
written in one transaction (step ``draining``) → wait until the agent's ``GET /info``
says it is draining with 0 requests in flight (or ``drain_timeout_s`` passes) → step
``actuating`` (owner, deadline, the command's process group recorded) → ``done`` or
``failed``. A failed or timed-out actuation undrains the worker (unless
``undrain_on_failure`` is off), records why, and holds that action of that model for
``failure_backoff_s``. scale_up: ``pending`` → ``actuating`` → ``done``/``failed``.
With the ``log`` actuator decisions are ``advisory``: stored and logged, nothing drained.

One sequence per model across reconcilers: a unique index admits one unfinished decision
per model, and the thread running it holds a PostgreSQL advisory lock per model on its
own connection. A new leader resumes what it finds unfinished; an ``actuating`` step whose
owner is gone is waited for (while its process group lives, on the same host) up to its
deadline, then killed and marked failed — never started a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import replace

import aiohttp
import psycopg2
import psycopg2.errors

from gpufleet.common import jsonlimits
from gpufleet.controlplane import scaling_store as sql
from gpufleet.controlplane import store
from gpufleet.controlplane.actuators import Outcome, actuate, group_alive, kill_group
from gpufleet.controlplane.db import LOCK_SCALING_MODEL, connect
from gpufleet.controlplane.routability import assess_row
from gpufleet.controlplane.scaling import Decision, ModelLoad, ScalingSettings, ScalingState, WorkerLoad, decide

log = logging.getLogger("gpufleet.scaling")

_INFO_MAX_BYTES = 64 * 1024


async def _get_info(url: str, timeout_s: float) -> tuple[int, bytes]:
    """``GET url``: its status and at most ``_INFO_MAX_BYTES`` + 1 bytes of its body."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                    connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False,
                                    max_line_size=8190, max_field_size=8190)
    async with session, session.get(url, allow_redirects=False) as resp:
        body = b""
        while len(body) <= _INFO_MAX_BYTES:
            piece = await resp.content.read(_INFO_MAX_BYTES + 1 - len(body))
            if not piece:
                break
            body += piece
        return resp.status, body


def read_info(agent_url: str, timeout_s: float) -> tuple[bool, int | None]:
    """(draining, in-flight count) from the agent's ``/info``, or (False, None) when it is
    unreadable. Workers are untrusted: ``timeout_s`` bounds the whole call (connect,
    headers, body), so an agent trickling its answer a byte at a time, each within any
    per-read timeout, is cut at it; whatever it sends costs only this call."""
    try:
        status, body = asyncio.run(asyncio.wait_for(_get_info(agent_url.rstrip("/") + "/info", timeout_s),
                                                    timeout_s))
        data = jsonlimits.loads(body) if status == 200 and len(body) <= _INFO_MAX_BYTES else None
    except Exception as exc:  # noqa: BLE001 - a timeout, a refused or malformed answer: unreadable
        log.debug("scaling: %s/info unreadable: %s: %s", agent_url, type(exc).__name__, exc)
        return False, None
    if not isinstance(data, dict) or not isinstance(data.get("inflight"), int) or data["inflight"] < 0:
        return False, None
    return data.get("draining") is True, data["inflight"]


class Scaler:
    def __init__(self, settings: ScalingSettings, db, publisher, stale_after_s: float | None = None, *,
                 probe_timeout_s: float = 2.0, me: str = "reconciler"):
        self.settings = settings
        self.db = db
        self.publisher = publisher
        self.stale_after_s = stale_after_s if stale_after_s is not None else publisher.heartbeat_interval_s * 3
        self.probe_timeout_s = probe_timeout_s
        self.me = me
        self.poll_s = min(1.0, max(0.1, settings.interval_s))
        self.states: dict[str, ScalingState] = {}
        self._states_lock = threading.Lock()
        self._busy: dict[str, threading.Thread] = {}
        self._leading = threading.Event()
        self._stopping = threading.Event()
        self._next_run = 0.0

    # -- leadership --------------------------------------------------------------------

    def take_over(self) -> None:
        """A new leader: publish its settings, pick up the policy's state; unfinished
        sequences are resumed by the next ``maybe_run``."""
        with self.db.cursor() as cur:
            sql.publish_settings(cur, self.me, self.settings)
            states = sql.load_states(cur)
        with self._states_lock:
            self.states = states
        self._leading.set()
        self._next_run = 0.0

    def step_down(self) -> None:
        """Stop waiting on drains (the next leader resumes them); a running command
        finishes, holding its model's lock, so the next leader waits for it."""
        self._leading.clear()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """The reconciler stops: running commands are killed and recorded as failed."""
        self._leading.clear()
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for thread in list(self._busy.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _halted(self) -> bool:
        return self._stopping.is_set() or not self._leading.is_set()

    # -- the loop ----------------------------------------------------------------------

    def maybe_run(self, now: float) -> list[Decision]:
        """Called every cycle by the leader (the first call after winning takes over)."""
        if not self._leading.is_set():
            self.take_over()
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
                # the TTFT over the agent's scaling window when it sends one (SCALING_TTFT_WINDOW_S)
                ttft = row["ttft_p95_scaling_ms"] if row["ttft_p95_scaling_ms"] is not None else row["ttft_p95_ms"]
                per_model[row["model_id"]].append(WorkerLoad(row["worker_id"], row["queue_depth"], row["running"],
                                                             row["gpu_util"], ttft))
        return [ModelLoad(m, tuple(ws)) for m, ws in sorted(per_model.items())]

    def run_once(self, now: float) -> list[Decision]:
        unfinished = self._resume()
        if not self.settings.enabled:
            return []
        decisions = []
        for load in self.loads():
            if load.model_id in unfinished or load.model_id in self._busy:
                continue  # one sequence per model: the unfinished one goes first
            with self._states_lock:
                state = self.states.get(load.model_id, ScalingState())
            decision, new_state = decide(load, state, self.settings, now)
            decision_id = self.record(decision, new_state)
            if decision_id is None:
                continue
            decisions.append(decision)
            if decision.action == "none":
                continue
            if self.settings.advisory:
                actuate(self.settings, decision, decision_id)  # logs it as advisory
                continue
            log.info("scaling %s: %s %d → %d (%s)%s [decision %d]", decision.model_id, decision.action,
                     decision.current_replicas, decision.desired_replicas, decision.reason,
                     f", draining {decision.drain_worker_id}" if decision.drain_worker_id else "", decision_id)
            self._start(decision.model_id, decision_id)
        return decisions

    def record(self, decision: Decision, new_state: ScalingState) -> int | None:
        """The decision row, the policy's new state and (for a scale-down) the drain, in
        one transaction; the in-memory state follows only once it is committed."""
        draining = (decision.action == "scale_down" and decision.drain_worker_id is not None
                    and not self.settings.advisory)
        try:
            with self.db.cursor() as cur:
                if decision.action == "none":
                    decision_id = sql.record_none(cur, decision)
                elif self.settings.advisory:
                    decision_id = sql.insert_decision(cur, decision, "log", "advisory")
                else:
                    decision_id = sql.insert_decision(
                        cur, decision, self.settings.actuator, "draining" if draining else "pending",
                        deadline_s=self.settings.drain_timeout_s if draining else None, owner=self.me)
                    if draining:
                        sql.drain(cur, decision.drain_worker_id)
                sql.save_state(cur, decision.model_id, new_state)
        except psycopg2.errors.UniqueViolation:
            log.warning("scaling %s: another reconciler has an unfinished decision; not deciding", decision.model_id)
            return None
        with self._states_lock:
            self.states[decision.model_id] = new_state
        if draining:
            try:
                self.publisher.unpublish_worker(decision.drain_worker_id, decision.model_id, "draining")
            except Exception as exc:  # noqa: BLE001 - the next reconcile cycle unpublishes it anyway
                log.warning("scaling: could not unpublish %s at once: %s", decision.drain_worker_id, exc)
        return decision_id

    def _resume(self) -> set[str]:
        """Start a thread for every unfinished sequence nobody here runs; returns the
        models that have one."""
        with self.db.cursor() as cur:
            rows = sql.unfinished(cur)
        for row in rows:
            if row["model_id"] not in self._busy and not self._stopping.is_set():
                self._start(row["model_id"], row["decision_id"])
        return {r["model_id"] for r in rows}

    def _start(self, model_id: str, decision_id: int) -> None:
        thread = threading.Thread(target=self._run_sequence, args=(model_id, decision_id), daemon=True,
                                  name=f"scale-{model_id}")
        self._busy[model_id] = thread
        thread.start()

    # -- one sequence, under the model's lock -----------------------------------------

    def _run_sequence(self, model_id: str, decision_id: int) -> None:
        conn = None
        try:
            conn = connect(self.db.dsn, application_name=f"gpufleet-scaling {model_id}"[:63])
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_SCALING_MODEL, model_id))
                if not cur.fetchone()[0]:
                    log.debug("scaling %s: decision %d is run by another reconciler; waiting for it",
                             model_id, decision_id)
                    return
            self._advance(decision_id)
        except Exception:  # noqa: BLE001 - the next cycle resumes from the persisted step
            log.exception("scaling %s: decision %d interrupted", model_id, decision_id)
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()  # releases the advisory lock
            self._busy.pop(model_id, None)

    def _advance(self, decision_id: int) -> None:
        with self.db.cursor() as cur:
            row = sql.get_decision(cur, decision_id)
        if row is None or row["step"] not in sql.UNFINISHED:
            return
        if row["step"] == "actuating":
            self._settle_orphan(row)  # started by a reconciler that is gone: never run it twice
            return
        if row["step"] == "draining":
            with self.db.cursor() as cur:
                sql.set_owner(cur, decision_id, self.me)
            cancelled = self._wait_idle(row)
            if cancelled is None:
                return  # stopped or no longer leading: the next leader resumes the wait
            if cancelled:
                self._finish(row, Outcome("failed", cancelled))
                return
        if self._halted():
            return
        with self.db.cursor() as cur:
            sql.set_step(cur, decision_id, "actuating", self.me, deadline_s=self.settings.actuation_timeout_s,
                         started=True)
        decision = Decision(row["model_id"], row["current_replicas"], row["desired_replicas"], row["action"],
                            row["reason"], row["drain_worker_id"], row["inputs"])
        started = time.monotonic()
        try:
            outcome = actuate(self.settings, decision, decision_id, stop=self._stopping,
                              on_start=lambda pgid: self._record_pgid(decision_id, pgid))
        except Exception as exc:  # noqa: BLE001 - recorded on the decision
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}"[:500])
        log.log(logging.INFO if outcome.ok else logging.ERROR, "scaling %s: decision %d %s after %.1fs%s",
                row["model_id"], decision_id, outcome.outcome, time.monotonic() - started,
                f": {outcome.error}" if outcome.error else "")
        self._finish(row, outcome)

    def _record_pgid(self, decision_id: int, pgid: int) -> None:
        with self.db.cursor() as cur:
            sql.set_command_pgid(cur, decision_id, pgid)

    def _wait_idle(self, row) -> str | None:
        """Wait until the drained worker's agent says it drains with nothing in flight, at
        most until the drain's deadline: each ``/info`` call is bounded by the probe timeout
        and by the time left, so a slow agent cannot hold the wait past it.
        Returns "" to go on, a reason to cancel, or None when this reconciler stopped."""
        worker_id, decision_id = row["drain_worker_id"], row["decision_id"]
        deadline = time.monotonic() + max(0.0, row["deadline_in_s"] or 0.0)
        last = row["drain_inflight"]
        while not self._halted():
            with self.db.cursor() as cur:
                worker = store.get_worker(cur, worker_id)
            if worker is None:
                return ""  # gone already: nothing left in flight there
            if worker["desired_status"] != "draining":
                return f"cancelled: worker {worker_id} was returned to service while draining"
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("scaling %s: drain of %s ran over %gs (%s in flight); actuating anyway",
                            row["model_id"], worker_id, self.settings.drain_timeout_s,
                            "unknown" if last is None else last)
                return ""
            draining, inflight = read_info(worker["agent_url"], min(self.probe_timeout_s, left))
            if inflight != last:
                with self.db.cursor() as cur:
                    sql.set_drain_inflight(cur, decision_id, inflight)
                last = inflight
            if draining and inflight == 0:
                return ""
            self._stopping.wait(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        return None

    def _settle_orphan(self, row) -> None:
        """An actuation started by a reconciler that no longer runs it: wait while its
        command's process group lives (when on this host) or until its deadline, kill
        what is left at the deadline, and mark it failed."""
        host = (row["owner"] or "").rsplit(":", 1)[0]
        pgid = row["command_pgid"] if host == socket.gethostname() else None
        deadline = time.monotonic() + max(0.0, row["deadline_in_s"] or 0.0)
        log.warning("scaling %s: decision %d was actuating under %s, which stopped; waiting for it",
                    row["model_id"], row["decision_id"], row["owner"])
        while not self._halted():
            alive = pgid is not None and group_alive(pgid)
            if pgid is not None and not alive:
                self._finish(row, Outcome("failed", f"the reconciler {row['owner']} stopped during the actuation; "
                                                    "its command has ended, with an unknown result"))
                return
            if time.monotonic() >= deadline:
                if alive:
                    kill_group(pgid)
                self._finish(row, Outcome("timed_out", f"the reconciler {row['owner']} stopped during the "
                                                       "actuation; marked failed at its deadline"
                                                       + ("; its process group was killed" if alive else "")))
                return
            self._stopping.wait(self.poll_s)

    def _finish(self, row, outcome: Outcome) -> None:
        model_id, action = row["model_id"], row["action"]
        undrained = None
        backoff_until = time.time() + self.settings.failure_backoff_s
        for attempt in range(3):  # a database blip must not turn a known outcome into an unknown one
            try:
                with self.db.cursor() as cur:
                    if not outcome.ok and action == "scale_down" and row["drain_worker_id"]:
                        undrained = self.settings.undrain_on_failure and sql.undrain(cur, row["drain_worker_id"])
                    sql.finish(cur, row["decision_id"], outcome.outcome, outcome.error, outcome.stdout,
                               outcome.stderr, undrained)
                    if not outcome.ok:
                        sql.set_backoff(cur, model_id, action, backoff_until)
                break
            except psycopg2.OperationalError:
                if attempt == 2:
                    raise
                time.sleep(2.0)
        if not outcome.ok:
            with self._states_lock:
                state = self.states.get(model_id, ScalingState())
                self.states[model_id] = replace(state, backoff_action=action, backoff_until=backoff_until,
                                                target_replicas=None)
            log.error("scaling %s: decision %d failed (%s)%s; %s held for %gs", model_id, row["decision_id"],
                      outcome.error, f"; {row['drain_worker_id']} returned to service" if undrained else "",
                      action, self.settings.failure_backoff_s)
