"""Fixtures shared by the integration tests."""

import pytest

from gpufleet.controlplane.testing import ControlPlaneClient, cp_env, start_control_plane


@pytest.fixture
def cp(daemons, database_url, redis_url, redis_server):
    """A control plane process on a fresh database, with a client for its APIs."""
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url))
    client = ControlPlaneClient(url, database_url, redis_server.client())
    yield client
    client.redis.close()
