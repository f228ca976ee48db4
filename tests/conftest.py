"""Fixtures for the memory store tests (``tests/test_store_*.py``): a real Redis, database 9."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis

STORE_REDIS_URL = "redis://127.0.0.1:6379/9"


def flushed_redis(url: str, who: str) -> Iterator[str]:
    """A Redis database of the local server, flushed before and after the test that uses it."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"the {who} tests need redis-server on 127.0.0.1:6379")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
            pytest.fail("these tests need redis-server on the PATH")
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        cmd += ["--save", "", *(a.replace("{port}", str(self.port)) for a in self.args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file already holds survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


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


@pytest.fixture
def store_redis_url() -> Iterator[str]:
    """The store tests' Redis database (9), flushed before and after each test."""
    yield from flushed_redis(STORE_REDIS_URL, "store")


@pytest.fixture
def store_config(store_redis_url: str, tmp_path: Path) -> Callable[..., Any]:
    """``store_config(backend, **overrides)`` -> StoreConfig for "redis" or "embedded" (dim 8 by default)."""
    from memory_store import IndexParams, StoreConfig

    def make(backend: str, **overrides: Any) -> StoreConfig:
        base = StoreConfig(
            dim=8,
            namespace="test",
            redis_url=store_redis_url if backend == "redis" else None,
            data_dir=tmp_path / "store",
            index=IndexParams(exact_threshold=10_000, min_nlist=8),
        )
        return replace(base, **overrides)

    return make


@pytest.fixture(params=["redis", "embedded"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(store_backend: str, store_config: Callable[..., Any]) -> AsyncIterator[Any]:
    """An open store of each backend (contract tests run once per backend)."""
    from memory_store import open_store

    opened = await open_store(store_config(store_backend))
    yield opened
    await opened.close()
