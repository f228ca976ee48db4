"""Connecting to Redis: a client for the configured URL, password and TLS CA file, answered PING with
bounded, exponentially backed-off retries. Passwords never appear in messages or logs.

With ``redis_cluster`` the client is redis-py's cluster client: the URL names one node, the client
learns the slot map from it and follows failovers and resharding (MOVED/ASK) itself. ``node_client``
gives a plain client of the master that serves a key, for commands that must share the connection of
the write before them (WAIT)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memory_store.config import StoreConfig

log = logging.getLogger(__name__)


def _options(config: StoreConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"decode_responses": False}
    if config.redis_password is not None:
        options["password"] = config.redis_password
    if config.redis_tls_ca_file is not None:  # StoreConfig checked that the URL is rediss://
        options["ssl_ca_certs"] = str(config.redis_tls_ca_file)
    return options


def _client(config: StoreConfig) -> aioredis.Redis:
    """A client for ``config.redis_url`` with the config's password and, for ``rediss://``, CA file;
    the cluster client with ``redis_cluster`` (typed as the plain one: the commands used are common)."""
    assert config.redis_url is not None
    if config.redis_cluster:
        cluster: Any = RedisCluster.from_url(config.redis_url, **_options(config))
        return cluster  # type: ignore[no-any-return]
    client: aioredis.Redis = aioredis.from_url(config.redis_url, **_options(config))
    return client


def node_client(config: StoreConfig, host: str, port: int) -> aioredis.Redis:
    """A plain client of one cluster node, with the credentials of the config (or of its URL) and TLS."""
    assert config.redis_url is not None
    parts = urlsplit(config.redis_url)
    options = _options(config)
    if parts.username:
        options.setdefault("username", unquote(parts.username))
    if parts.password:
        options.setdefault("password", unquote(parts.password))
    client: aioredis.Redis = aioredis.Redis(host=host, port=port, ssl=parts.scheme == "rediss", **options)
    return client


async def drop_connections(client: aioredis.Redis) -> None:
    """Close the client's open connections (it opens new ones on its next command): ends a blocked
    read that missed its task's cancellation."""
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():
            await node.disconnect()
    else:
        await client.connection_pool.disconnect()


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


async def connect(config: StoreConfig) -> aioredis.Redis:
    """A client that answered PING; retries with exponential backoff, then raises ConnectionError."""
    url = _redacted(config.redis_url or "")
    attempts, backoff_s = config.connect_attempts, config.connect_backoff_s
    client = _client(config)
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except AuthenticationError as exc:  # a wrong password does not get better by retrying
            await client.aclose()
            raise ConnectionError(f"Redis at {url} refused the credentials: {exc}") from exc
        except ResponseError as exc:  # e.g. NOAUTH: a password is required and none was given
            await client.aclose()
            raise ConnectionError(f"Redis at {url} refused the connection: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise ConnectionError(f"Redis at {url} did not answer after {attempts} attempts") from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "Redis at %s not reachable (%s); retry %d/%d in %.1fs", url, exc, attempt, attempts, delay
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
