"""The product against real vLLM: the ``fleet`` fixture (tests/support/vllm_fleet.py) in
front of the real vLLM servers of ``vllm_servers``, which start once per session and are
shared (tests/support/vllm_fixtures.py)."""

import pytest

from support.vllm_fleet import Fleet


@pytest.fixture
def fleet(daemons, database_url, redis_url, redis_server):
    f = Fleet(daemons, database_url, redis_url, redis_server)
    yield f
    f.redis.close()
