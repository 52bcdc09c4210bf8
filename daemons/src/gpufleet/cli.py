"""``gpufleet``: the operator's command line, a thin client of the admin API.

Environment: ``GPUFLEET_CONTROL_PLANE_URL`` and ``GPUFLEET_ADMIN_TOKEN`` (or
``GPUFLEET_ADMIN_TOKEN_FILE``); ``gpufleet db migrate`` uses ``GPUFLEET_DATABASE_URL``.
Exit codes: 0 ok, 1 the API refused or could not be reached (its message is printed),
2 configuration or usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import requests

from gpufleet.common.config import ConfigError, Env, exit_on_config_error
from gpufleet.common.secretfile import write_secret_file

EXIT_API = 1


class ApiFailure(Exception):
    pass


class Client:
    def __init__(self, base_url: str, token: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> tuple[int, dict]:
        url = self.base_url + path
        try:
            resp = self.session.request(method, url, json=body, params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ApiFailure(f"cannot reach the control plane at {self.base_url} ({type(exc).__name__}): "
                             "check GPUFLEET_CONTROL_PLANE_URL and that gpufleet-controlplane runs") from None
        try:
            data = resp.json()
        except ValueError:
            data = {}
        if resp.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else resp.text[:200]
            hint = " (check GPUFLEET_ADMIN_TOKEN)" if resp.status_code == 401 else ""
            raise ApiFailure(f"{message}{hint} [HTTP {resp.status_code}]")
        return resp.status_code, data


def client_from_env(env: Env) -> Client:
    url = env.url("GPUFLEET_CONTROL_PLANE_URL", required=True, example="http://cp.tailnet:8003")
    token = env.str("GPUFLEET_ADMIN_TOKEN")
    if token is None:
        token_file = env.str("GPUFLEET_ADMIN_TOKEN_FILE")
        if token_file is None:
            raise ConfigError("GPUFLEET_ADMIN_TOKEN is not set: set it to the admin token "
                              "(or GPUFLEET_ADMIN_TOKEN_FILE to a file holding it)")
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"GPUFLEET_ADMIN_TOKEN_FILE={token_file!r} cannot be read: {exc.strerror}") from None
    if token.startswith("sha256:"):
        raise ConfigError("GPUFLEET_ADMIN_TOKEN holds a sha256: hash; the CLI needs the admin token itself")
    return Client(url, token)


# -- output ------------------------------------------------------------------------------


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    text = str(value)
    if len(text) >= 19 and text[4] == "-" and text[10] == "T":
        return text[:19].replace("T", " ")  # ISO timestamps (UTC) to the second
    return text


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def emit(args, data, human: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=False) if args.json else human)


# -- commands ----------------------------------------------------------------------------


def cmd_status(args, client: Client):
    _, data = client.call("GET", "/v1/admin/status")
    w, inst = data["workers"], data["instances"]
    lines = [f"instances: {inst['total']} ({inst['retired']} retired, {inst['without_token']} not enrolled yet)",
             f"workers:   {w['total']} ({w['routable']} routable)  "
             + "  ".join(f"{k}={v}" for k, v in sorted(w["by_health"].items())),
             f"api keys:  {data['api_keys']['active']} active"]
    if data.get("reconciler"):
        r = data["reconciler"]
        lines.append(f"reconciler: leader {r['leader']}, last cycle {_age(r['last_cycle_age_s'])}")
    lines.append("")
    models = [{"model_id": m, **e} for m, e in sorted(data["models"].items())]
    lines.append(table(models, [("model_id", "MODEL"), ("routable", "ROUTABLE"), ("workers", "WORKERS"),
                                ("queue_depth", "QUEUE")]))
    emit(args, data, "\n".join(lines))


def cmd_workers(args, client: Client):
    _, data = client.call("GET", "/v1/admin/workers", params={"model_id": args.model} if args.model else None)
    rows = [{**w, "heartbeat": _age(w["heartbeat_age_s"]),
             "desired": w["desired_status"], "probe": w["last_probe_error"] if w["last_probe_ok"] is False
             else ("ok" if w["last_probe_ok"] else "-")} for w in data["workers"]]
    emit(args, data, table(rows, [("worker_id", "WORKER"), ("model_id", "MODEL"), ("status", "STATUS"),
                                  ("desired", "DESIRED"), ("health", "HEALTH"), ("heartbeat", "HEARTBEAT"),
                                  ("queue_depth", "QUEUE"), ("running", "RUNNING"), ("gpu_util", "GPU%"),
                                  ("advertise_url", "URL"), ("probe", "PROBE")]))


def _write_secret_file(path: str, secret: str) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable for a moment)."""
    try:
        write_secret_file(path, secret)
    except OSError as exc:
        raise ApiFailure(f"cannot write the join secret to {path}: {exc.strerror}; issue a new one with "
                         "`gpufleet instances join-secret ID --file PATH`") from None


def _hand_over_secret(args, data: dict, secret: str, expires_at: str) -> str:
    """Print the join secret once, or write it to --join-secret-file and print only the path."""
    if args.secret_file:
        _write_secret_file(args.secret_file, secret)
        for key in ("join_secret", "secret"):
            data.pop(key, None)
        data["join_secret_file"] = args.secret_file
        return f"join secret written to {args.secret_file} (mode 0600), valid until {expires_at}, single use"
    return (f"join secret (shown once; single use, valid until {expires_at}); give it to the worker's agent "
            f"in WORKER_JOIN_SECRET_FILE (mode 0600):\n{secret}")


def cmd_instances_add(args, client: Client):
    body = {"instance_id": args.instance_id, "provider_instance_id": args.provider_instance_id,
            "hostname": args.hostname, "model_id": args.model, "worker_ids": args.worker_ids}
    status, data = client.call("POST", "/v1/admin/instances", {k: v for k, v in body.items() if v is not None})
    if status != 201:
        known = data.get("instance", {})
        emit(args, data, f"instance {args.instance_id} already known (unchanged: model {known.get('model_id')}, "
                         f"workers {','.join(known.get('worker_ids') or [])}); no join secret issued — "
                         f"`gpufleet instances join-secret {args.instance_id}` issues one")
        return
    human = _hand_over_secret(args, data, data["join_secret"], data["join_secret_expires_at"])
    emit(args, data, f"instance {args.instance_id} added for {args.model}\n{human}")


def cmd_instances_join_secret(args, client: Client):
    _, data = client.call("POST", f"/v1/admin/instances/{_seg(args.instance_id)}/join-secret")
    emit(args, data, _hand_over_secret(args, data, data["join_secret"], data["expires_at"])
         + "\n(any earlier unused join secret of this instance no longer works)")


def cmd_instances_list(args, client: Client):
    _, data = client.call("GET", "/v1/admin/instances")
    emit(args, data, table(data["instances"], [
        ("instance_id", "INSTANCE"), ("hostname", "HOSTNAME"), ("provider_instance_id", "PROVIDER ID"),
        ("model_id", "MODEL"), ("worker_ids", "WORKER IDS"), ("has_token", "TOKEN"), ("token_prefix", "PREFIX"),
        ("workers", "WORKERS"), ("join_secret_expires_at", "JOIN SECRET UNTIL"),
        ("retired_at", "RETIRED")]))


def cmd_instances_retire(args, client: Client):
    _, data = client.call("POST", f"/v1/admin/instances/{_seg(args.instance_id)}/retire")
    emit(args, data, f"instance {args.instance_id} retired; its token is revoked and its workers removed")


def cmd_tokens_rotate(args, client: Client):
    _, data = client.call("POST", f"/v1/admin/instances/{_seg(args.instance_id)}/rotate-token")
    emit(args, data, f"new worker token for {args.instance_id} (shown once; the old one no longer works):\n"
                     f"{data['token']}")


def cmd_drain(args, client: Client, undrain: bool = False):
    verb = "undrain" if undrain else "drain"
    _, data = client.call("POST", f"/v1/admin/workers/{_seg(args.worker_id)}/{verb}")
    emit(args, data, f"worker {args.worker_id}: " + (
        "asked to return to service" if undrain else "removed from the ready set and asked to drain"))


def cmd_keys_create(args, client: Client):
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    _, data = client.call("POST", "/v1/admin/keys", {"name": args.name, "models": models, "rpm": args.rpm})
    emit(args, data, f"api key {data['key_id']} ({args.name}) created. The key is shown only now:\n{data['key']}")


def cmd_keys_list(args, client: Client):
    _, data = client.call("GET", "/v1/admin/keys")
    rows = data["keys"] if args.all else [k for k in data["keys"] if k["active"]]
    emit(args, {"keys": rows}, table(rows, [("key_id", "KEY ID"), ("name", "NAME"), ("key_prefix", "PREFIX"),
                                            ("models", "MODELS"), ("rpm", "RPM"), ("created_at", "CREATED"),
                                            ("revoked_at", "REVOKED")]))


def cmd_keys_revoke(args, client: Client):
    _, data = client.call("DELETE", f"/v1/admin/keys/{_seg(args.key_id)}")
    emit(args, data, f"api key {args.key_id} revoked")


def cmd_scaling(args, client: Client):
    params = {"limit": args.limit, **({"model_id": args.model} if args.model else {})}
    _, data = client.call("GET", "/v1/admin/scaling", params=params)
    source = data.get("settings_source") or {}
    actuator = data["actuator"] + (" (advisory: nothing is drained or started)" if data.get("advisory") else "")
    head = f"scaling: {'on' if data['enabled'] else 'off'}, actuator {actuator}" + (
        f", leader {source['reconciler']}" if source.get("reconciler") else "")
    rows = [{**d, "step": _step(d), "outcome": "advisory" if d.get("advisory") else d.get("outcome"),
             "error": _one_line(d.get("actuation_error"))} for d in data["decisions"]]
    emit(args, data, head + "\n" + table(rows, [
        ("decided_at", "WHEN"), ("decision_id", "ID"), ("model_id", "MODEL"), ("action", "ACTION"),
        ("current_replicas", "FROM"), ("desired_replicas", "TO"), ("drain_worker_id", "DRAIN"),
        ("actuator", "ACTUATOR"), ("step", "STEP"), ("outcome", "OUTCOME"), ("error", "ERROR"),
        ("reason", "REASON")]))


def _step(d: dict) -> str | None:
    step = d.get("step")
    if step == "draining" and d.get("drain_inflight") is not None:
        return f"draining ({d['drain_inflight']} in flight)"
    if step == "failed" and d.get("undrained"):
        return "failed, undrained"
    return step


def _one_line(text: str | None, limit: int = 80) -> str | None:
    if not text:
        return None
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def cmd_db_migrate(args, _client=None):
    from gpufleet.controlplane.migrate import current_version, migrate  # noqa: PLC0415

    dsn = Env().str("GPUFLEET_DATABASE_URL", required=True,
                    example="postgresql://gpufleet:PASSWORD@127.0.0.1:5432/gpufleet")
    import psycopg2  # noqa: PLC0415

    try:
        applied = migrate(dsn)
        version = current_version(dsn)
    except psycopg2.Error as exc:
        raise ApiFailure(f"migration failed: {str(exc).strip()}") from None
    emit(args, {"applied": applied, "version": version},
         (f"applied {', '.join(applied)}; " if applied else "schema up to date; ") + f"version {version}")


def _seg(value: str) -> str:
    return requests.utils.quote(value, safe="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Operate a gpufleet: workers, instances, "
                                     "tokens, API keys. Needs GPUFLEET_CONTROL_PLANE_URL and GPUFLEET_ADMIN_TOKEN.")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_, parent=sub):
        p = parent.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    add("status", cmd_status, "the fleet at a glance")
    add("workers", cmd_workers, "workers with health and last heartbeat").add_argument("--model")
    instances = sub.add_parser("instances", help="instances known to the control plane").add_subparsers(
        dest="sub", required=True, metavar="add|join-secret|list|retire")
    p = add("add", cmd_instances_add, "make an instance known; prints its one-time join secret", instances)
    p.add_argument("instance_id")
    p.add_argument("--model", required=True, help="the model the instance serves (its token is bound to it)")
    p.add_argument("--worker-id", dest="worker_ids", action="append", metavar="W",
                   help="a worker id the instance may register (repeat; default: the instance id)")
    p.add_argument("--provider-instance-id")
    p.add_argument("--hostname")
    p.add_argument("--join-secret-file", dest="secret_file", metavar="PATH",
                   help="write the join secret to PATH (mode 0600) instead of printing it")
    p = add("join-secret", cmd_instances_join_secret, "issue a new one-time join secret (printed once)",
            instances)
    p.add_argument("instance_id")
    p.add_argument("--file", dest="secret_file", metavar="PATH",
                   help="write the join secret to PATH (mode 0600) instead of printing it")
    add("list", cmd_instances_list, "list instances", instances)
    add("retire", cmd_instances_retire, "retire an instance (revokes its token)", instances).add_argument(
        "instance_id")
    tokens = sub.add_parser("tokens", help="worker tokens").add_subparsers(dest="sub", required=True,
                                                                          metavar="rotate")
    add("rotate", cmd_tokens_rotate, "issue a new worker token (printed once)", tokens).add_argument("instance_id")
    add("drain", cmd_drain, "take a worker out of rotation and ask it to drain").add_argument("worker_id")
    add("undrain", lambda a, c: cmd_drain(a, c, undrain=True), "return a drained worker").add_argument("worker_id")
    keys = sub.add_parser("keys", help="API keys of the OpenAI endpoint").add_subparsers(
        dest="sub", required=True, metavar="create|list|revoke")
    p = add("create", cmd_keys_create, "create a key (printed once)", keys)
    p.add_argument("name")
    p.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    p.add_argument("--rpm", type=int, default=0, help="requests per minute (0 = unlimited)")
    add("list", cmd_keys_list, "list keys (never the keys themselves)", keys).add_argument(
        "--all", action="store_true", help="include revoked keys")
    add("revoke", cmd_keys_revoke, "revoke a key at once", keys).add_argument("key_id")
    p = add("scaling", cmd_scaling, "recent scaling decisions: actuator, step, outcome, error")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--model", help="only this model's decisions")
    db = sub.add_parser("db", help="the control plane's database").add_subparsers(dest="sub", required=True,
                                                                                  metavar="migrate")
    add("migrate", cmd_db_migrate, "apply pending schema migrations (GPUFLEET_DATABASE_URL)", db)
    return parser


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    try:
        client = None if args.func is cmd_db_migrate else client_from_env(Env())
        args.func(args, client)
    except ApiFailure as exc:
        print(f"gpufleet: error: {exc}", file=sys.stderr)
        return EXIT_API
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
