"""A private Redis Cluster for the tests: ``redis-server`` nodes in cluster mode on free loopback ports
(each with its own data folder), joined by ``redis-cli --cluster create``, optionally with replicas of
the first master attached by ``redis-cli --cluster add-node``. conftest.py builds its fixtures on it
(``suite_redis_cluster_url``, ``cluster_redis_url``, ``redis_cluster``).

The ``redis-cli`` binary only creates the cluster and adds nodes; every check and wait goes through the
``redis`` package to single nodes, polled every 50 ms against a deadline, so a cluster that does not come
up (or fail over) fails the test with what it was still waiting for instead of hanging it.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

# conftest.py imports this module only inside its fixtures, so that importing conftest here is no cycle.
from conftest import RedisServer
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("memrec.tests")

SLOTS = 16384
POLL_S = 0.05
READY_TIMEOUT_S = 30.0  # a healthy cluster is ready ~2.2 s after its nodes start (see start())
REDIS_CLI_TIMEOUT_S = 30.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ClusterNodeView:
    """One line of CLUSTER NODES: a node as the node that answered sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]  # inclusive ranges; slots being migrated are left out

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})


def parse_cluster_nodes(text: str) -> list[ClusterNodeView]:
    """CLUSTER NODES' text: ``<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch>
    <link> <slot> ...``."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        slots = []
        for token in parts[8:]:
            if token.startswith("["):  # [slot->-id] / [slot-<-id]: a migration in progress
                continue
            first, _, last = token.partition("-")
            slots.append((int(first), int(last or first)))
        master = None if parts[3] == "-" else parts[3]
        nodes.append(ClusterNodeView(parts[0], port, frozenset(parts[2].split(",")), master, tuple(slots)))
    return nodes


def node_client(port: int) -> redis.Redis:
    """A client of one node that neither retries nor waits long: the cluster checks poll on their own,
    and the default retry (10 tries, growing back-off) would stall every poll of a killed node."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


def node_command(client: redis.Redis, *args: str) -> str:
    """A command's reply as redis-py reads it off the wire, as text (no reply parsing: CLUSTER NODES is
    parsed here, into what the checks need)."""
    return str(client.execute_command(*args))  # type: ignore[no-untyped-call]  # untyped in redis-py


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO as ``field -> value`` strings."""
    text = node_command(client, "CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def cluster_nodes(client: redis.Redis) -> list[ClusterNodeView]:
    return parse_cluster_nodes(node_command(client, "CLUSTER", "NODES"))


def poll(what: str, timeout: float, check: Callable[[], str | None]) -> float:
    """Call ``check`` every 50 ms until it returns None (done) and return the seconds that took; at the
    deadline fail the test with ``what`` and the last thing ``check`` said it was waiting for."""
    began = time.monotonic()
    deadline = began + timeout
    while True:
        try:
            waiting = check()
        except (redis.RedisError, OSError) as exc:  # a node still starting, or one just killed
            waiting = f"{type(exc).__name__}: {exc}"
        if waiting is None:
            return time.monotonic() - began
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not done after {timeout:g} s, still waiting for: {waiting}")
        time.sleep(POLL_S)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all bound at once, so none is handed out twice)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def redis_cli(*args: str) -> None:
    """Run ``redis-cli`` (creating or growing a cluster); fail the test with its output if it fails."""
    exe = shutil.which("redis-cli")
    if exe is None:
        pytest.fail("redis-cli is not on the PATH (Debian/Ubuntu: apt-get install redis-tools)")
    cmd = [exe, *args]
    try:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=REDIS_CLI_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {REDIS_CLI_TIMEOUT_S:.0f} s: {_tail(exc.stdout)}")
    if done.returncode != 0:
        # redis-cli prints its [ERR] lines on stdout, so both streams go into the message.
        pytest.fail(
            f"{' '.join(cmd)} exited with {done.returncode}: stderr: {done.stderr.strip()!r}; "
            f"stdout: {_tail(done.stdout)}"
        )


def _tail(output: str | bytes | None, lines: int = 15) -> str:
    """The last lines of redis-cli's output, without its colours (it writes them even into a pipe)."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    text = ANSI_ESCAPE.sub("", output or "").strip()
    return repr("\n".join(text.splitlines()[-lines:]))


@dataclass
class RedisClusterNodes:
    """A private Redis Cluster: ``masters`` nodes that share the 16384 slots (``redis-cli --cluster
    create``, no replicas there) and ``replicas`` more nodes, each a replica of the first master (with
    ``spread_replicas``, of the masters in turn: the first replica the first master's, the next the
    second's, and so on).

    The node timeout is short (0.5 s): a killed master's replica takes over ~1.7 s after the kill
    (node timeout, then Redis' 0.5-1 s election delay), and the nodes gossip often enough that
    ``redis-cli`` finds the cluster joined at its first look (with 1 s it often waits 1-2 s more).
    Nothing is saved to disk. ``start()`` returns once every node reports ``cluster_state:ok`` with all
    slots assigned and every replica's master lists it online (so WAIT counts it)."""

    base_dir: Path
    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 500
    spread_replicas: bool = False
    servers: list[RedisServer] = field(default_factory=list)
    killed_at: dict[int, float] = field(default_factory=dict)  # port -> time.monotonic() of the kill

    def __post_init__(self) -> None:
        if self.masters < 3:
            raise ValueError(f"redis-cli --cluster create needs at least 3 masters, not {self.masters}")
        if self.replicas < 0:
            raise ValueError(f"replicas must be 0 or more, not {self.replicas}")

    @property
    def url(self) -> str:
        """A start-up URL for cluster clients: the first master (a client finds the others from it)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def ports(self) -> list[int]:
        """Every node's port, as started: the masters in slot order, then the replicas."""
        return [server.port for server in self.servers]

    @property
    def replica_ports(self) -> list[int]:
        """The nodes started as replicas (see :meth:`replica_of`); a failover makes one a master."""
        return self.ports[self.masters :]

    def replica_of(self, index: int) -> int:
        """The port of the master that the ``index``-th replica was started to follow."""
        return self.ports[index % self.masters if self.spread_replicas else 0]

    def start(self) -> None:
        """Start the nodes and join them. ~2.2 s, bounded by Redis itself: a new master reports
        ``cluster_state:ok`` only 2 s after it starts, and redis-cli sleeps 1 s in create and in
        add-node (which overlap those 2 s)."""
        began = time.monotonic()
        ports = free_ports(2 * (self.masters + self.replicas))  # a client port and a bus port each
        for port, bus_port in zip(ports[0::2], ports[1::2], strict=True):
            data = self.base_dir / f"node-{port}"
            data.mkdir(parents=True)
            server = RedisServer(port, data, self._node_args(bus_port, data))
            self.servers.append(server)  # before start(): stop() also kills a half-started cluster
            server.start()
        started = time.monotonic()
        first = f"127.0.0.1:{self.ports[0]}"
        masters = [f"127.0.0.1:{port}" for port in self.ports[: self.masters]]
        redis_cli("--cluster", "create", *masters, "--cluster-replicas", "0", "--cluster-yes")
        created = time.monotonic()
        for index, port in enumerate(self.replica_ports):
            with node_client(self.replica_of(index)) as client:
                master_id = node_command(client, "CLUSTER", "MYID")
            new = f"127.0.0.1:{port}"
            redis_cli(
                "--cluster", "add-node", new, first, "--cluster-slave", "--cluster-master-id", master_id
            )
        added = time.monotonic()
        poll(f"Redis Cluster on ports {self.ports}", READY_TIMEOUT_S, self._not_ready)
        log.info(
            "memrec tests: Redis Cluster of %d masters and %d replicas up in %.2f s (processes %.2f s, "
            "redis-cli create %.2f s, add-node %.2f s, ready %.2f s) on ports %s",
            self.masters,
            self.replicas,
            time.monotonic() - began,
            started - began,
            created - started,
            added - created,
            time.monotonic() - added,
            self.ports,
        )

    def _node_args(self, bus_port: int, data: Path) -> tuple[str, ...]:
        return (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes-{port}.conf",  # in the node's own data folder (--dir)
            # The bus port would be port + 10000 by default: past 65535 for most free ports.
            "--cluster-port",
            str(bus_port),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--appendonly",
            "no",
            # Redis 7 waits 5 s for more replicas before a diskless full sync: a replica would lag.
            "--repl-diskless-sync-delay",
            "0",
            "--logfile",
            str(data / "redis.log"),  # what a failed start or failover leaves to read
        )

    def _not_ready(self) -> str | None:
        for server in self.servers:
            with node_client(server.port) as client:
                info = cluster_info(client)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != str(SLOTS):
                    return f"127.0.0.1:{server.port}: {_cluster_state(info)}"
                if info.get("cluster_known_nodes") != str(len(self.servers)):
                    return f"127.0.0.1:{server.port} knows {info.get('cluster_known_nodes')} nodes"
                if server.port in self.replica_ports and (waiting := _replica_not_online(server.port)):
                    return waiting
        return None

    def _live(self) -> list[RedisServer]:
        return [server for server in self.servers if server.proc is not None]

    def view(self) -> list[ClusterNodeView]:
        """CLUSTER NODES as the first node still running sees it."""
        live = self._live()
        if not live:
            pytest.fail(f"every node of the Redis Cluster on ports {self.ports} is stopped")
        with node_client(live[0].port) as client:
            return cluster_nodes(client)

    def master_ports(self) -> list[int]:
        """The masters now serving slots and not marked failing, as the cluster (a running node) sees
        it, in slot order: after a failover the promoted replica takes the killed master's place."""
        masters = [n for n in self.view() if "master" in n.flags and n.slots and not n.failing]
        return [n.port for n in sorted(masters, key=lambda n: n.slots[0])]

    def slot_ranges(self, port: int) -> list[tuple[int, int]]:
        """The slot ranges (inclusive) that the node on ``port`` serves, as the cluster sees it."""
        return [r for node in self.view() if node.port == port for r in node.slots]

    def flushall(self) -> None:
        """FLUSHALL on every current master (replicas follow their master)."""
        for port in self.master_ports():
            with node_client(port) as client:
                client.flushall()

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``: its peers notice after the node timeout."""
        for server in self.servers:
            if server.port == port:
                server.kill()
                self.killed_at[port] = time.monotonic()
                return
        raise ValueError(f"no node of this cluster listens on {port} (ports: {self.ports})")

    def wait_promoted(self, port: int, timeout: float = 15.0) -> float:
        """Wait until the replica on ``port`` has become a master and every running node reports
        ``cluster_state:ok`` and names it a master (so a client that refreshes its slot map from any of
        them finds it). Returns the seconds since the last kill (or since this call, without one)."""
        began = time.monotonic()
        poll(f"promotion of 127.0.0.1:{port}", timeout, lambda: self._not_promoted(port))
        since = max(self.killed_at.values(), default=began)
        took = time.monotonic() - since
        log.info("memrec tests: 127.0.0.1:%d is master, cluster ok again %.2f s after the kill", port, took)
        return took

    def restart(self, port: int, timeout: float = 15.0) -> float:
        """Start the killed node on ``port`` again, on its data folder: its nodes.conf keeps its identity,
        so it rejoins the cluster (empty: nothing was saved), as a replica of whichever node took over
        its slots. Returns once it is a replica that its master lists online; the seconds that took."""
        server = next((s for s in self.servers if s.port == port), None)
        if server is None:
            raise ValueError(f"no node of this cluster listens on {port} (ports: {self.ports})")
        if server.proc is not None:
            raise ValueError(f"the node on {port} is running")
        began = time.monotonic()
        server.start()
        poll(f"rejoin of 127.0.0.1:{port} as a replica", timeout, lambda: self._not_rejoined(port))
        took = time.monotonic() - began
        log.info("memrec tests: 127.0.0.1:%d rejoined as a replica in %.2f s", port, took)
        return took

    def _not_rejoined(self, port: int) -> str | None:
        with node_client(port) as client:
            role = client.info("replication").get("role")
        if role != "slave":
            return f"127.0.0.1:{port} is still a {role}"
        return _replica_not_online(port)

    def _not_promoted(self, port: int) -> str | None:
        with node_client(port) as client:
            role = client.info("replication").get("role")
        if role != "master":
            return f"127.0.0.1:{port} is still a {role}"
        for server in self._live():
            with node_client(server.port) as client:
                info = cluster_info(client)
                if info.get("cluster_state") != "ok":
                    return f"127.0.0.1:{server.port}: {_cluster_state(info)}"
                seen = [n for n in cluster_nodes(client) if n.port == port]
                if not seen or "master" not in seen[0].flags or not seen[0].slots:
                    return f"127.0.0.1:{server.port} does not see 127.0.0.1:{port} as a master yet"
        return None

    def stop(self) -> None:
        """Kill every node (nothing to keep: the nodes save nothing)."""
        for server in self.servers:
            server.kill()


def _replica_not_online(port: int) -> str | None:
    """What the replica on ``port`` still lacks to acknowledge writes (WAIT): its link to its master up,
    and the master listing it ``state=online`` (after a full sync Redis puts a replica online only at
    its first acknowledgement, up to 1 s after the link is up: WAIT counts it from then)."""
    with node_client(port) as client:
        info = client.info("replication")
    if info.get("master_link_status") != "up":
        return f"replica 127.0.0.1:{port}: master_link_status:{info.get('master_link_status')}"
    master = int(info["master_port"])
    with node_client(master) as client:
        listed = [v for k, v in client.info("replication").items() if k.startswith("slave")]
    states = [str(r.get("state")) for r in listed if isinstance(r, dict) and int(r.get("port", 0)) == port]
    if states != ["online"]:
        return f"master 127.0.0.1:{master} lists replica 127.0.0.1:{port} as {states or 'absent'}"
    return None


def _cluster_state(info: dict[str, str]) -> str:
    return (
        f"cluster_state:{info.get('cluster_state')}, "
        f"cluster_slots_assigned:{info.get('cluster_slots_assigned')}"
    )
