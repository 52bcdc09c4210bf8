"""Throw-away Redis and PostgreSQL servers in temp dirs on free ports (like pytest-redis
and pytest-postgresql), so tests never depend on a system service being up."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import psycopg2
import redis

from .procs import Daemon, free_port, wait_until


def _which(name: str, patterns: tuple[str, ...] = ()) -> str:
    found = shutil.which(name)
    if found:
        return found
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    raise FileNotFoundError(f"{name} not found: run `make deps` (installs redis-server and postgresql)")


class RedisServer:
    def __init__(self, port: int | None = None, password: str | None = None):
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="gpufleet-redis-")
        self.daemon: Daemon | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [_which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.daemon = Daemon(f"redis-{self.port}", argv)
        client = self.client()
        wait_until(client.ping, timeout=10, what=f"redis on {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()
            self.daemon = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    """initdb + postgres on a free port. PostgreSQL refuses to run as root; as root we run
    it as the ``postgres`` system user (created by Debian's package)."""

    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gpufleet-pg-")
        self.data = os.path.join(self.dir, "data")
        self.daemon: Daemon | None = None
        self.user = "gpufleet"
        self._run_as = None
        if os.geteuid() == 0:
            self._run_as = pwd.getpwnam("postgres")
            os.chown(self.dir, self._run_as.pw_uid, self._run_as.pw_gid)
            os.chmod(self.dir, 0o755)

    def _cmd(self, argv: list[str]) -> list[str]:
        if self._run_as:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def dsn(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> PostgresServer:
        initdb = _which("initdb", ("/usr/lib/postgresql/*/bin/initdb",))
        postgres = _which("postgres", ("/usr/lib/postgresql/*/bin/postgres",))
        subprocess.run(self._cmd([initdb, "-D", self.data, "-U", self.user, "--auth=trust",
                                  "--encoding=UTF8", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.daemon = Daemon(f"postgres-{self.port}", self._cmd([
            postgres, "-D", self.data, "-p", str(self.port), "-h", "127.0.0.1",
            "-k", self.dir, "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=300"]))
        wait_until(self._ready, timeout=30, what=f"postgres on {self.port}")
        return self

    def _ready(self) -> bool:
        if self.daemon and not self.daemon.alive():
            raise RuntimeError(f"postgres exited:\n{self.daemon.output()}")
        conn = psycopg2.connect(self.admin_dsn, connect_timeout=1)
        conn.close()
        return True

    def create_database(self, name: str) -> str:
        conn = psycopg2.connect(self.admin_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.dsn(name)

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()
            self.daemon = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
