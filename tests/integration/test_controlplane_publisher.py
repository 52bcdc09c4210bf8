"""The Publisher writes the Redis contract exactly as docs/contracts.md says."""

import json
import time

import pytest

from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.publisher import ApiKeyRecord, Publisher


@pytest.fixture
def redis_client(redis_server, redis_url):
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def publisher(redis_client):
    return Publisher(redis_client, RedisKeys("gpufleet:"), heartbeat_interval_s=2)


@pytest.fixture
def events(redis_client):
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("gpufleet:events")
    pubsub.get_message(timeout=1)

    def drain(wait=0.5):
        got, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.05)
            if message:
                got.append(json.loads(message["data"]))
        return got

    yield drain
    pubsub.close()


def test_publish_worker_writes_hash_ttl_sets_and_one_ready_event(publisher, redis_client, events):
    assert publisher.publish_worker("w1", "m", "http://127.0.0.1:9000/", queue_depth=3, running=2,
                                    kv_cache_usage=0.25, gpu_util=70, ttft_p95_ms=120.5) is True
    worker = redis_client.hgetall("gpufleet:worker:w1")
    assert worker["url"] == "http://127.0.0.1:9000"
    assert worker["model_id"] == "m" and worker["status"] == "ready"
    assert (worker["queue_depth"], worker["running"], worker["kv_cache_usage"]) == ("3", "2", "0.25")
    assert (worker["gpu_util"], worker["ttft_p95_ms"]) == ("70", "120.5")
    assert abs(float(worker["updated_at"]) - time.time()) < 5
    assert 0 < redis_client.pttl("gpufleet:worker:w1") <= 6000
    assert redis_client.smembers("gpufleet:workers:ready:m") == {"w1"}
    assert redis_client.smembers("gpufleet:models") == {"m"}
    # a refresh updates the stats but is not a transition
    assert publisher.publish_worker("w1", "m", "http://127.0.0.1:9000", queue_depth=5) is False
    assert redis_client.hget("gpufleet:worker:w1", "queue_depth") == "5"
    got = events()
    assert [(e["type"], e["worker_id"], e["model_id"]) for e in got] == [("ready", "w1", "m")]


def test_unpublish_keeps_marked_hash_and_drops_empty_model(publisher, redis_client, events):
    publisher.publish_worker("w1", "m", "http://a:1")
    publisher.publish_worker("w2", "m", "http://b:1")
    events()
    assert publisher.unpublish_worker("w1", "m", "draining") is True
    assert redis_client.smembers("gpufleet:workers:ready:m") == {"w2"}
    assert redis_client.hget("gpufleet:worker:w1", "status") == "draining"
    assert redis_client.smembers("gpufleet:models") == {"m"}
    assert publisher.unpublish_worker("w2", "m", "removed") is True
    assert not redis_client.exists("gpufleet:worker:w2")
    assert redis_client.smembers("gpufleet:models") == set()
    # idempotent: no second event, and no hash resurrected without a TTL
    assert publisher.unpublish_worker("w2", "m", "unready") is False
    assert not redis_client.exists("gpufleet:worker:w2")
    assert [(e["type"], e["worker_id"]) for e in events()] == [("draining", "w1"), ("removed", "w2")]
    with pytest.raises(ValueError):
        publisher.unpublish_worker("w1", "m", "bogus")


def test_model_change_leaves_the_old_ready_set(publisher, redis_client):
    publisher.publish_worker("w1", "old", "http://a:1")
    publisher.publish_worker("w1", "new", "http://a:1")
    assert redis_client.smembers("gpufleet:workers:ready:old") == set()
    assert redis_client.smembers("gpufleet:models") == {"new"}
    assert publisher.ready_workers() == {"new": {"w1"}}


def test_api_keys_publish_delete_and_sync(publisher, redis_client, events):
    publisher.publish_api_key("a" * 64, "k1", "alice", ["m1", "m2"], 60)
    assert redis_client.hgetall("gpufleet:apikey:" + "a" * 64) == {
        "key_id": "k1", "name": "alice", "models": "m1,m2", "rpm": "60"}
    assert publisher.delete_api_key("a" * 64, "k1") is True
    assert not redis_client.exists("gpufleet:apikey:" + "a" * 64)
    assert [e["type"] for e in events()] == ["keys"]

    redis_client.hset("gpufleet:apikey:" + "f" * 64, mapping={"key_id": "ghost", "name": "x", "models": "", "rpm": "0"})
    publisher.publish_api_key("b" * 64, "k2", "bob", [], 0)
    result = publisher.sync_api_keys([
        {"key_hash": "b" * 64, "key_id": "k2", "name": "bob", "models": ["m"], "rpm": 5},
        ApiKeyRecord("c" * 64, "k3", "carol"),
    ])
    assert result == {"added": 1, "changed": 1, "deleted": 1}
    assert sorted(redis_client.keys("gpufleet:apikey:*")) == [
        "gpufleet:apikey:" + "b" * 64, "gpufleet:apikey:" + "c" * 64]
    assert redis_client.hget("gpufleet:apikey:" + "b" * 64, "models") == "m"
    assert [e["type"] for e in events()] == ["keys"]
    # a second sync with the same rows changes nothing and says nothing
    assert publisher.sync_api_keys([("b" * 64, "k2", "bob", ["m"], 5), ApiKeyRecord("c" * 64, "k3", "carol")]) == {
        "added": 0, "changed": 0, "deleted": 0}
    assert events() == []


def test_prefix_is_honoured(redis_client):
    publisher = Publisher(redis_client, RedisKeys("other:"), heartbeat_interval_s=1)
    publisher.publish_worker("w", "m", "http://a:1")
    assert redis_client.smembers("other:workers:ready:m") == {"w"}
    assert not redis_client.exists("gpufleet:workers:ready:m")
