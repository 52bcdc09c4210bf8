"""Workers enrolled the way the roles enrol them: the instance declared through the CLI, its
join secret in a 0600 file, the agent started with ``WORKER_JOIN_SECRET_FILE``."""

from __future__ import annotations

import os
import tempfile

from gpufleet.agent.testing import agent_env, start_agent
from gpufleet.controlplane.testing import run_cli


def enrol_agent(daemons, cp_url: str, instance_id: str, model: str, vllm_url: str, *,
                agent_cp_url: str | None = None, **env):
    """Declare ``instance_id`` for ``model`` and start its agent in front of ``vllm_url``;
    ``agent_cp_url`` is where the agent sends its calls (default ``cp_url``).
    Returns (daemon, agent_url)."""
    secret_file = os.path.join(tempfile.mkdtemp(prefix="gpufleet-join-"), "join-secret")
    run_cli(cp_url, "instances", "add", instance_id, "--model", model, "--join-secret-file", secret_file)
    return start_agent(daemons, agent_env(
        instance_id=instance_id, control_plane_url=agent_cp_url or cp_url, model_id=model, vllm_base_url=vllm_url,
        port=daemons.port(), WORKER_JOIN_SECRET_FILE=secret_file, **env), name=f"agent-{instance_id}")
