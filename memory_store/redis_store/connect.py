"""Connecting to Redis: a client for the configured URL, password and TLS CA file, answered PING with
bounded, exponentially backed-off retries. Passwords never appear in messages or logs."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memory_store.config import StoreConfig

log = logging.getLogger(__name__)


def _client(config: StoreConfig) -> aioredis.Redis:
    """A client for ``config.redis_url`` with the config's password and, for ``rediss://``, CA file."""
    assert config.redis_url is not None
    options: dict[str, Any] = {"decode_responses": False}
    if config.redis_password is not None:
        options["password"] = config.redis_password
    if config.redis_tls_ca_file is not None:  # StoreConfig checked that the URL is rediss://
        options["ssl_ca_certs"] = str(config.redis_tls_ca_file)
    client: aioredis.Redis = aioredis.from_url(config.redis_url, **options)
    return client


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
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise ConnectionError(f"Redis at {url} did not answer after {attempts} attempts") from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "Redis at %s not reachable (%s); retry %d/%d in %.1fs", url, exc, attempt, attempts, delay
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
