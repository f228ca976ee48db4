"""The Redis backend: shared state in Redis, a local FAISS index per replica that tails the log stream.

=====================  =================================================================================
module                 concept
=====================  =================================================================================
``store``              ``RedisMemoryStore``: the ``MemoryStore`` API, the write path (Lua scripts)
``replica``            this process's index: log tail, read-your-writes, snapshots, restore and rebuild
``codec``              memories as bytes: write-script arguments, log entries, memory hashes
``user_memories``      per-user (RAMRec) memories in one hash per user, optimistic read-modify-write
``connect``            a client for the configured URL, credentials and TLS, with bounded retries
``layout``             the key names and the Lua write/remove scripts
=====================  =================================================================================
"""

from __future__ import annotations

from memory_store.redis_store.connect import connect
from memory_store.redis_store.store import RedisMemoryStore

__all__ = ["RedisMemoryStore", "connect"]
