"""The example inventory's vault placeholders stop every play before it changes anything.

Runs the real playbooks against inventory/example, every host pointed at this machine
(connection local, no become, check mode, and only the tasks tagged `always`: fact
gathering and the preflight checks), and reads which variables the failure names.
A user who copies inventory/example and forgets a secret must be stopped at the start
of the play, told which variable to set, and never shown the value.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VAULT = yaml.safe_load((REPO / "inventory/example/group_vars/all/vault.yml").read_text())
STRONG = "s3cure-test-value-0123456789abcdef"
# What the example needs besides its secrets on a machine without a tailnet or GPU.
LOCAL = {
    "ansible_connection": "local",
    "ansible_become": False,
    "ansible_python_interpreter": sys.executable,
    "gpufleet_controlplane_address": "127.0.0.1",
    "gpufleet_with_nvidia_driver": False,
}


def run_play(playbook: str, **extra) -> tuple[int, str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventory/example/hosts.yml", playbook,
         "--check", "--tags", "gpufleet-preflight-only", "-e", json.dumps({**LOCAL, **extra})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr


def weak(output: str) -> set[str]:
    names = set()
    for line in re.findall(r"Weak secret: (.*?) \(empty, shorter than", output.replace("\n", " ")):
        names.update(n.strip() for n in line.split(","))
    return names


def assert_stopped_before_any_change(rc: int, output: str):
    assert rc != 0, output[-3000:]
    recaps = re.findall(r"changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)", output)
    assert recaps and all(changed == "0" and failed == "1" for changed, failed in recaps), output[-3000:]
    for value in VAULT.values():
        if value:
            assert value not in output, "a secret's value appears in the output"


@pytest.mark.parametrize(("playbook", "fixes", "named"), [
    # the tailnet's auth key is checked first wherever the tailnet is joined
    ("playbooks/controlplane.yml", {}, {"tailscale_authkey"}),
    ("playbooks/router.yml", {}, {"tailscale_authkey"}),
    # then each role's own secrets, in the order the play runs the roles
    ("playbooks/controlplane.yml", {"gpufleet_with_tailscale": False}, {"redis_password"}),
    ("playbooks/controlplane.yml", {"gpufleet_with_tailscale": False, "redis_password": STRONG},
     {"postgresql_password"}),
    ("playbooks/controlplane.yml", {"gpufleet_with_tailscale": False, "redis_password": STRONG,
                                    "postgresql_password": STRONG},
     {"controlplane_admin_token", "the password in controlplane_database_url",
      "the password in controlplane_redis_url"}),
    ("playbooks/router.yml", {"gpufleet_with_tailscale": False},
     {"router_vllm_api_key", "the password in router_redis_url"}),
    ("playbooks/workers.yml", {"gpufleet_with_tailscale": False}, {"vllm_api_key"}),
    ("playbooks/workers.yml", {"gpufleet_with_tailscale": False, "vllm_api_key": STRONG},
     {"worker_agent_vllm_api_key", "worker_agent_admin_token"}),
    ("playbooks/rolling_update.yml", {}, {"vllm_api_key"}),
])
def test_example_vault_placeholders_stop_the_play(playbook, fixes, named):
    rc, output = run_play(playbook, **fixes)
    assert_stopped_before_any_change(rc, output)
    assert weak(output) == named, output[-3000:]


def test_real_secrets_pass_the_preflight():
    strong = {name: f"{STRONG}-{name}" for name in VAULT if name != "vault_hf_token"}
    rc, output = run_play("playbooks/workers.yml", **strong)
    assert rc == 0, output[-3000:]
    assert "Weak secret" not in output
