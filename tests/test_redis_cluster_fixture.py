"""The Redis Cluster fixtures (tests/redis_cluster.py, conftest.py): the session's cluster spreads keys
over all its masters and is empty at the start of every test; a private cluster with a replica of its
first master fails over when that master is killed, and a cluster client finds the promoted replica."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException
from redis_cluster import RedisClusterNodes, node_client, node_command

log = logging.getLogger("memrec.tests")

T = TypeVar("T")


def dbsizes(client: RedisCluster) -> dict[str, int]:
    """Keys per master, ``host:port -> DBSIZE``."""
    return {node.name: int(client.dbsize(target_nodes=node)) for node in client.get_primaries()}


def test_keys_spread_over_every_master(cluster_redis_url: str) -> None:
    with RedisCluster.from_url(cluster_redis_url, decode_responses=True) as client:
        for i in range(100):
            client.set(f"spread:{i}", str(i))
        sizes = dbsizes(client)
        assert client.get("spread:42") == "42"
    assert len(sizes) >= 3, sizes  # redis-cli --cluster create wants 3 masters at least
    assert all(n > 0 for n in sizes.values()), sizes
    assert sum(sizes.values()) == 100, sizes


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_starts_on_an_empty_cluster(cluster_redis_url: str, run: int) -> None:
    # Whichever run goes second finds the keys of the first flushed away.
    with RedisCluster.from_url(cluster_redis_url, decode_responses=True) as client:
        assert sum(dbsizes(client).values()) == 0
        for i in range(20):
            client.set(f"left-behind:{run}:{i}", "x")


def key_on(nodes: RedisClusterNodes, port: int) -> str:
    """A key whose slot (CLUSTER KEYSLOT) the master on ``port`` serves."""
    ranges = nodes.slot_ranges(port)
    with node_client(port) as client:
        for i in range(1000):
            key = f"failover:{i}"
            slot = int(node_command(client, "CLUSTER", "KEYSLOT", key))
            if any(first <= slot <= last for first, last in ranges):
                return key
    raise AssertionError(f"no key among 1000 maps to the slots {ranges} of 127.0.0.1:{port}")


def retried(call: Callable[[], T], timeout: float = 10.0) -> T:
    """``call()``, retried every 50 ms while the cluster is down or a node is gone; a cluster client
    refreshes its slot map after such errors."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (ClusterDownError, redis.ConnectionError, redis.TimeoutError, RedisClusterException):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def test_replica_takes_over_a_killed_master(redis_cluster: Callable[..., RedisClusterNodes]) -> None:
    nodes = redis_cluster(masters=3, replicas=1)
    master, replica = nodes.ports[0], nodes.replica_ports[0]
    key = key_on(nodes, master)
    # Started from the master that is about to die: the client learned the other nodes at start-up.
    client = RedisCluster.from_url(nodes.url, decode_responses=True)
    try:
        client.set(key, "before")
        with node_client(master) as direct:
            assert direct.wait(1, 1000) == 1  # the replica has the write before its master dies

        nodes.kill(master)
        failover_s = nodes.wait_promoted(replica, timeout=15.0)
        log.info("memrec tests: failover of 127.0.0.1:%d took %.2f s", master, failover_s)

        assert retried(lambda: client.get(key)) == "before"
        assert retried(lambda: client.set(key, "after"))
    finally:
        client.close()

    survivors = nodes.master_ports()
    assert replica in survivors and master not in survivors
    assert nodes.slot_ranges(replica) == [(0, 5460)]
    startup = [ClusterNode("127.0.0.1", port) for port in survivors]
    with RedisCluster(startup_nodes=startup, decode_responses=True) as fresh:
        assert fresh.get(key) == "after"
