"""Shared fixtures: the test suite's own Redis, private redis-server processes, the memory store tests'
stores (``tests/test_store_*.py``), and the rule that decides whether a missing tool or data set skips
a test or fails it.

Redis: unless ``MEMREC_TEST_REDIS_URL`` names a server, the suite starts its own ``redis-server`` (from
the PATH) on a free loopback port the first time a test asks for Redis, and stops it at the end of the
session; it never relies on whatever answers on 6379. Each purpose keeps its own database number on
that server (store tests 9, service tests 11), flushed around every test that uses it. Tests of the
embedded backend never ask for Redis.

Redis Cluster (tests/redis_cluster.py): unless ``MEMREC_TEST_REDIS_CLUSTER_URL`` names one, a private
3-master cluster (``redis-server`` and ``redis-cli`` from the PATH) starts the first time a test asks for
it and stops at the end of the session, its masters flushed around every test (``cluster_redis_url``).
Tests that kill nodes get clusters of their own (``redis_cluster``). Without the two binaries those tests
skip, and fail under CI.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

if TYPE_CHECKING:
    from redis_cluster import RedisClusterNodes

log = logging.getLogger("memrec.tests")

REDIS_URL_ENV = "MEMREC_TEST_REDIS_URL"
REDIS_CLUSTER_URL_ENV = "MEMREC_TEST_REDIS_CLUSTER_URL"
STORE_REDIS_DB = 9
DATA_DIR = Path(os.environ.get("MEMREC_DATA_DIR", "../shared/data"))
_started_redis: list[str] = []  # the session's own redis-server and cluster, for the summary line


# ----------------------------------------------------------------------------- required or skipped


def under_ci() -> bool:
    """CI sets CI=true: there a test whose tool or data is missing must fail, never skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_or_fail(reason: str, required: bool) -> NoReturn:
    """Skip a test whose tool or data is missing, unless it is required here: then fail, so that a CI
    run cannot go green by skipping what it was meant to check."""
    if required:
        pytest.fail(f"{reason} (required here: CI=true or a MEMREC_REQUIRE_* variable is set)")
    pytest.skip(reason)


def data_required() -> bool:
    """The shared data sets are mandatory under CI or with ``MEMREC_REQUIRE_DATA=1``."""
    return under_ci() or os.environ.get("MEMREC_REQUIRE_DATA") == "1"


def dataset_dir(name: str) -> Path:
    """``DATA_DIR / name``, the folder of a shared data set; the calling test skips when it is absent
    (fails where the data is required, see :func:`data_required`)."""
    path = DATA_DIR / name
    if not path.is_dir():
        skip_or_fail(f"data set {name} not found in {DATA_DIR} (set MEMREC_DATA_DIR)", data_required())
    return path


# ------------------------------------------------------------------------------------------ Redis


def redis_db_url(base: str, db: int) -> str:
    """``base`` (a Redis URL, any database in it ignored) pointed at database ``db``."""
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def flushed_redis(url: str, who: str) -> Iterator[str]:
    """A Redis database, flushed before and after the test that uses it."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        client.close()
        pytest.fail(f"the {who} tests cannot reach Redis at {_safe(url)}: {exc}")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _safe(url: str) -> str:
    """``url`` without a password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


REDIS_MISSING = (
    "redis-server is not on the PATH: install it (Debian/Ubuntu: apt-get install redis-server; "
    f"macOS: brew install redis), or set {REDIS_URL_ENV} to a Redis the tests may flush"
)


@dataclass
class RedisServer:
    """A private ``redis-server`` process (own port and data folder) that a test may kill and restart."""

    port: int
    data_dir: Path
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if "--tls-port" in self.args else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail(REDIS_MISSING)
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        cmd += ["--save", "", *(a.replace("{port}", str(self.port)) for a in self.args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        pytest.fail(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file already holds survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def suite_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis server of this test session (database 0 of it; :func:`redis_db_url` picks another).

    ``MEMREC_TEST_REDIS_URL`` names an external one; otherwise a private ``redis-server`` starts here,
    on the first test that needs Redis, and is stopped when the session ends. A session-wide server
    rather than one per test: start-up costs ~50 ms, and the tests already keep apart by database
    number and flushing."""
    external = os.environ.get(REDIS_URL_ENV, "").strip()
    if external:
        yield external
        return
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"), ("--appendonly", "no"))
    server.start()
    _started_redis.append(f"redis-server on 127.0.0.1:{server.port}")
    log.info("memrec tests: started redis-server on 127.0.0.1:%d", server.port)
    try:
        yield server.url
    finally:
        server.kill()  # nothing to keep: it saves nothing to disk


def pytest_report_header(config: pytest.Config) -> list[str]:
    external = os.environ.get(REDIS_URL_ENV, "").strip()
    if external:
        lines = [f"memrec tests: Redis at {_safe(external)} ({REDIS_URL_ENV})"]
    else:
        lines = [
            "memrec tests: a private redis-server starts on a free loopback port when a test needs Redis"
        ]
    cluster = os.environ.get(REDIS_CLUSTER_URL_ENV, "").strip()
    if cluster:
        lines.append(f"memrec tests: Redis Cluster at {_safe(cluster)} ({REDIS_CLUSTER_URL_ENV})")
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what in _started_redis:
        terminalreporter.write_line(f"memrec tests: started {what} (stopped at the end)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``redis_server(*args)`` starts a private redis-server with extra arguments (``{port}`` is its
    port; ``--port 0 --tls-port {port}`` makes it TLS-only); all are killed after."""
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        data = tmp_path / f"redis{len(servers)}"
        data.mkdir()
        server = RedisServer(free_port(), data, args)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


# ----------------------------------------------------------------------------------- Redis Cluster


def require_cluster_tools(alternative: str = "") -> None:
    """Skip (fail under CI) a test that needs a private Redis Cluster where ``redis-server`` or
    ``redis-cli`` is not on the PATH."""
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        reason = (
            f"{' and '.join(missing)} not on the PATH, needed for a private Redis Cluster: install Redis "
            "(Debian/Ubuntu: apt-get install redis-server redis-tools; macOS: brew install redis)"
        )
        skip_or_fail(reason + alternative, under_ci())


def flush_cluster(url: str) -> None:
    """FLUSHALL on every master of the Redis Cluster at ``url``. A new client each time: it reads the
    cluster's current masters, whatever happened to the slot map since the last flush."""
    try:
        client = RedisCluster.from_url(url)
    except (redis.RedisError, RedisClusterException) as exc:
        pytest.fail(f"the cluster tests cannot reach a Redis Cluster at {_safe(url)}: {exc}")
    try:
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
    finally:
        client.close()


@pytest.fixture(scope="session")
def suite_redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis Cluster of this test session (a start-up URL: a cluster client finds the other nodes).

    ``MEMREC_TEST_REDIS_CLUSTER_URL`` names an external one; otherwise a private 3-master cluster (no
    replicas) starts here, on the first test that needs it (~2 s, most of it Redis' own delay before a
    new master takes writes), and is stopped when the session ends. Tests that kill nodes must use
    :func:`redis_cluster` instead."""
    external = os.environ.get(REDIS_CLUSTER_URL_ENV, "").strip()
    if external:
        yield external
        return
    require_cluster_tools(f", or set {REDIS_CLUSTER_URL_ENV} to a Redis Cluster the tests may flush")
    from redis_cluster import RedisClusterNodes  # here, not at the top: it imports this module

    nodes = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        nodes.start()
        where = ",".join(str(port) for port in nodes.ports)
        _started_redis.append(f"a {nodes.masters}-master Redis Cluster on 127.0.0.1:{where}")
        yield nodes.url
    finally:
        nodes.stop()


@pytest.fixture
def cluster_redis_url(suite_redis_cluster_url: str) -> Iterator[str]:
    """The session's Redis Cluster, every master flushed before and after each test."""
    flush_cluster(suite_redis_cluster_url)
    yield suite_redis_cluster_url
    flush_cluster(suite_redis_cluster_url)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[Callable[..., RedisClusterNodes]]:
    """``redis_cluster(masters=3, replicas=1)`` starts a private Redis Cluster of the test's own (the
    replicas follow the first master; with ``spread_replicas=True`` the masters in turn), for tests that
    kill nodes; all are stopped after the test."""
    require_cluster_tools()
    from redis_cluster import RedisClusterNodes  # here, not at the top: it imports this module

    clusters: list[RedisClusterNodes] = []

    def start(masters: int = 3, replicas: int = 1, spread_replicas: bool = False) -> RedisClusterNodes:
        nodes = RedisClusterNodes(
            tmp_path / f"cluster{len(clusters)}", masters, replicas, spread_replicas=spread_replicas
        )
        clusters.append(nodes)  # before start(): a half-started cluster is stopped too
        nodes.start()
        return nodes

    yield start
    for nodes in clusters:
        nodes.stop()


# ------------------------------------------------------------------------------------ store fixtures


@pytest.fixture
def store_redis_url(suite_redis_url: str) -> Iterator[str]:
    """The store tests' Redis database (9), flushed before and after each test."""
    yield from flushed_redis(redis_db_url(suite_redis_url, STORE_REDIS_DB), "store")


@pytest.fixture
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """``store_config(backend, **overrides)`` -> StoreConfig for "redis", "embedded" or "cluster" (a Redis
    Cluster, its namespace in 16 slot groups; dim 8 by default). Redis is asked for only when a "redis"
    or "cluster" config is made: the embedded tests run without one."""
    from memory_store import IndexParams, StoreConfig
    from model.transitions import MAX_ORDER

    def make(backend: str, **overrides: Any) -> StoreConfig:
        redis_url = None
        if backend == "redis":
            redis_url = str(request.getfixturevalue("store_redis_url"))
        elif backend == "cluster":
            redis_url = str(request.getfixturevalue("cluster_redis_url"))
        base = StoreConfig(
            dim=8,
            namespace="test",
            redis_url=redis_url,
            redis_cluster=backend == "cluster",
            data_dir=tmp_path / "store",
            index=IndexParams(exact_threshold=10_000, min_nlist=8),
            recent_width=MAX_ORDER,  # the service's width: the model's transition order
        )
        return replace(base, **overrides)

    return make


@pytest.fixture(params=["redis", "embedded", "cluster"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(store_backend: str, store_config: Callable[..., Any]) -> AsyncIterator[Any]:
    """An open store of each backend (contract tests run once per backend)."""
    from memory_store import open_store

    opened = await open_store(store_config(store_backend))
    yield opened
    await opened.close()
