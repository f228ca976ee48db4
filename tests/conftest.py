"""Fixtures for the memory store tests (``tests/test_store_*.py``): a real Redis, database 9."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
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
