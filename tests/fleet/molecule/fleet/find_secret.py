#!/usr/bin/env python3
"""Search a podman container for a secret from the outside, so the secret never enters it.

Streams the container's whole filesystem out as a tar (tmpfs mounts such as /run and
/tmp included; /proc and /sys left out) and looks into every regular file, then reads
every process's command line and environment. Prints where the secret was found (paths,
process ids), never the secret; exit status 1 if it was found anywhere, 0 if not.

    SECRET=... find_secret.py CONTAINER [--expect-found]

--expect-found inverts the verdict: a control run with a secret that must be there (the
vLLM API key in /etc/gpufleet/vllm.env) proves the search can find one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

PROCS = r"""for p in /proc/[0-9]*; do
  echo "== ${p#/proc/}"; tr '\0' '\n' < "$p/cmdline" 2>/dev/null; echo; tr '\0' '\n' < "$p/environ" 2>/dev/null; echo
done"""


def files_with(container: str, secret: bytes) -> tuple[list[str], int]:
    tar = subprocess.Popen(["podman", "exec", container, "tar", "-C", "/", "-cf", "-",
                            "--exclude=./proc", "--exclude=./sys", "."],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    hits, scanned = [], 0
    with tarfile.open(fileobj=tar.stdout, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            scanned += 1
            handle = archive.extractfile(member)
            tail = b""
            while chunk := handle.read(1 << 20):
                if secret in tail + chunk:
                    hits.append("/" + member.name.lstrip("./"))
                    break
                tail = chunk[-len(secret):]
    tar.wait()
    return hits, scanned


def processes_with(container: str, secret: bytes) -> list[str]:
    out = subprocess.run(["podman", "exec", container, "sh", "-c", PROCS],
                         capture_output=True, check=True).stdout
    hits, pid = [], "?"
    for line in out.split(b"\n"):
        if line.startswith(b"== "):
            pid = line[3:].decode()
        elif secret in line and pid not in hits:
            hits.append(pid)
    return hits


def main() -> int:
    container = sys.argv[1]
    expect_found = "--expect-found" in sys.argv[2:]
    secret = os.environ["SECRET"].encode()
    if len(secret) < 16:
        print("find_secret: SECRET must be a real secret (16+ characters)")
        return 2
    files, scanned = files_with(container, secret)
    procs = processes_with(container, secret)
    print(f"{container}: {scanned} files searched; secret in files {files or 'none'}, "
          f"in processes (command line or environment) {procs or 'none'}")
    if scanned < 1000:
        print(f"find_secret: only {scanned} files came out of {container}: the search did not work")
        return 2
    found = bool(files or procs)
    return 0 if found == expect_found else 1


if __name__ == "__main__":
    sys.exit(main())
