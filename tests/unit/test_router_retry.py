"""Retry policy and budget, and the router's configuration."""

import pytest

from gpufleet.common.config import ConfigError
from gpufleet.router.config import RouterConfig
from gpufleet.router.retry import Outcome, RetryBudget, RetryPolicy, classify_status


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_status_classes():
    assert classify_status(200) is Outcome.OK
    assert classify_status(404) is Outcome.CLIENT_ERROR
    assert classify_status(503) is Outcome.SERVER_ERROR
    assert not Outcome.CLIENT_ERROR.retryable and not Outcome.CLIENT_ERROR.counts_against_worker
    assert all(o.retryable for o in (Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET))


def test_budget_limits_retries_to_a_fraction_of_requests():
    clock = Clock()
    budget = RetryBudget(ratio=0.1, min_per_s=0.0, capacity=5, clock=clock)
    # the initial reserve
    assert sum(budget.try_spend() for _ in range(20)) == 5
    # then one retry per ten requests: an outage does not multiply the load
    for _ in range(100):
        budget.deposit()
    assert sum(budget.try_spend() for _ in range(100)) == 5  # capped at capacity
    for _ in range(30):
        budget.deposit()
    assert sum(budget.try_spend() for _ in range(100)) == 3


def test_budget_floor_refills_with_time():
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_s=2.0, capacity=4, clock=clock)
    assert sum(budget.try_spend() for _ in range(10)) == 4
    clock.now += 1.0
    assert sum(budget.try_spend() for _ in range(10)) == 2


def test_retry_policy_counts_and_stream_rule():
    policy = RetryPolicy(retries=2, budget=RetryBudget(ratio=1, min_per_s=0, capacity=100))
    assert policy.should_retry(Outcome.SERVER_ERROR, attempts=1, streamed_to_client=False)
    assert policy.should_retry(Outcome.TIMEOUT, attempts=2, streamed_to_client=False)
    assert not policy.should_retry(Outcome.TIMEOUT, attempts=3, streamed_to_client=False)
    assert not policy.should_retry(Outcome.CLIENT_ERROR, attempts=1, streamed_to_client=False)
    assert not policy.should_retry(Outcome.RESET, attempts=1, streamed_to_client=True)


def test_config_defaults_and_validation():
    cfg = RouterConfig.from_env({"GPUFLEET_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert (cfg.host, cfg.port, cfg.policy, cfg.retries) == ("0.0.0.0", 8002, "cache_aware", 2)
    cfg = RouterConfig.from_env({"GPUFLEET_REDIS_URL": "redis://h:1/0", "GPUFLEET_ROUTER_POLICY": "round-robin",
                                 "GPUFLEET_BIND": "127.0.0.1:9000", "GPUFLEET_ROUTER_PROCESSES": "3"})
    assert (cfg.policy, cfg.port, cfg.processes) == ("round_robin", 9000, 3)


@pytest.mark.parametrize("env, words", [
    ({}, "GPUFLEET_REDIS_URL is not set"),
    ({"GPUFLEET_REDIS_URL": "http://x"}, "not a valid URL"),
    ({"GPUFLEET_REDIS_URL": "redis://h:1", "GPUFLEET_ROUTER_POLICY": "fastest"}, "GPUFLEET_ROUTER_POLICY"),
    ({"GPUFLEET_REDIS_URL": "redis://h:1", "GPUFLEET_ROUTER_RETRIES": "-1"}, "GPUFLEET_ROUTER_RETRIES"),
    ({"GPUFLEET_REDIS_URL": "redis://h:1", "GPUFLEET_ROUTER_CONNECT_TIMEOUT_S": "soon"}, "not a number"),
    ({"GPUFLEET_REDIS_URL": "redis://h:1", "GPUFLEET_BIND": "nowhere"}, "host:port"),
])
def test_config_errors_say_what_to_set(env, words):
    with pytest.raises(ConfigError, match=words):
        RouterConfig.from_env(env)
