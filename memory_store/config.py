"""Configuration of the memory store: one frozen dataclass, validated on construction.

The service maps its settings onto :class:`StoreConfig`; tests and the benchmark build it directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from memory_store.user_memory import QualityFn, recency_frequency_quality

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# StoreConfig's integer fields and their least valid values
_MINIMA = (
    ("user_memory_capacity", 1),
    ("history_len", 1),
    ("recent_width", 0),
    ("state_window", 0),
    ("connect_attempts", 1),
    ("first_new_item", 1),
)


# What the IVF index stores per memory (memory_store.ivf): the vector (float32), half floats, or one byte
# per dimension (8-bit scalar quantisation). reports/index_scale.md measures them.
IndexKind = Literal["ivf_flat", "ivf_fp16", "ivf_sq8"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)
# IndexParams.kind: one of them, or "auto": ivf_flat below ``compress_from`` memories, ivf_sq8 from there
# (at 1M and 10M memories SQ8 served the accuracy of exact search in 0.4 of the bytes of ivf_flat).
IndexChoice = Literal["auto", "ivf_flat", "ivf_fp16", "ivf_sq8"]
INDEX_CHOICES: tuple[str, ...] = get_args(IndexChoice)
_AUTO_KINDS = ("ivf_flat", "ivf_sq8")

# Hash-tag groups of a namespace on Redis Cluster: enough that the groups spread over every master of a
# cluster of a few, few enough that a replica tails each group's log stream with a connection of its own.
CLUSTER_SLOT_GROUPS = 16


@dataclass(frozen=True, slots=True)
class IndexParams:
    """How the FAISS index follows the number of memories it holds.

    Below ``exact_threshold`` memories the index is exact (flat inner product). At or above it the index
    is rebuilt as an IVF index of ``kind`` with ``nlist ≈ nlist_per_sqrt · sqrt(n)`` lists (a power of
    two, clamped to [min_nlist, max_nlist]), trained on a sample of ``train_points_per_list · nlist``
    vectors, and rebuilt again when it holds ``regrow_factor`` times the vectors it was trained for.
    ``kind`` "auto" builds ivf_flat below ``compress_from`` memories and ivf_sq8 from there: the switch
    comes with the first rebuild at that size or above (:meth:`kind_for`).
    ``nprobe`` is the number of lists scanned per query (recall versus latency): 128 reached
    recall@20 >= 0.95 at 1M clustered memories with nlist 4096 (reports/store.md).
    """

    kind: IndexChoice = "auto"
    compress_from: int = 1_000_000
    exact_threshold: int = 50_000
    nlist_per_sqrt: float = 4.0
    min_nlist: int = 256
    max_nlist: int = 16_384
    train_points_per_list: int = 40
    regrow_factor: float = 4.0
    nprobe: int = 128
    seed: int = 0
    # OpenMP threads of a FAISS search, set in the thread that searches: OpenMP keeps the setting per
    # thread, so worker threads (asyncio.to_thread) ignore the main thread's and use every core.
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INDEX_CHOICES:
            raise ValueError(f"index kind must be one of {', '.join(INDEX_CHOICES)}, got {self.kind!r}")
        for name in ("exact_threshold", "compress_from"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.min_nlist <= self.max_nlist:
            raise ValueError(f"need 1 <= min_nlist <= max_nlist, got {self.min_nlist}, {self.max_nlist}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.regrow_factor <= 1.0:
            raise ValueError(f"regrow_factor must be > 1, got {self.regrow_factor}")

    def kind_for(self, n: int) -> IndexKind:
        """The kind an IVF index of ``n`` memories is built in."""
        if self.kind != "auto":
            return self.kind
        return "ivf_sq8" if n >= self.compress_from else "ivf_flat"

    def builds(self, kind: str) -> bool:
        """Whether these parameters build indexes of ``kind`` (at some size)."""
        return kind in _AUTO_KINDS if self.kind == "auto" else kind == self.kind


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Everything a store needs. ``redis_url=None`` selects the embedded backend (needs ``data_dir``).

    Capacities: ``capacity`` bounds all collaborative memories of the namespace (the oldest go first),
    ``user_capacity`` bounds the collaborative memories of one user (that user's oldest go first), and
    ``user_memory_capacity`` is C, the number of per-user (RAMRec) memories kept by quality.
    ``None`` means unbounded.

    ``recent_width``: how many of its prefix's last items each memory keeps (the lags its item
    transitions are counted at, ``followers``). The width is the model's (its transition order): the
    service sets it from the model, and the store has no opinion of its own, so the default 0 keeps none
    and counts no transitions (a write that brings prefix items is then refused). Stored data of another
    width stays readable: the items are padded with 0 or cut to the most recent ``recent_width``.

    ``state_window``: the encoder states kept beside the histories (``memory_store.states``) encode a
    history's last ``state_window`` items, the service's encoder window; 0 (the default) keeps none.

    ``first_new_item``: the internal id the first item registered after training gets
    (``register_items``), the model's vocabulary size + 1; the service sets it from the model, as the
    width. Ids below it are the model's own.
    """

    dim: int = 64
    namespace: str = "default"
    redis_url: str | None = None
    # Redis credentials and TLS: the password overrides one in the URL; the CA file is used with
    # ``rediss://`` URLs (TLS) to verify the server.
    redis_password: str | None = field(default=None, repr=False)
    redis_tls_ca_file: Path | None = None
    # Redis Cluster: the URL names one node (redis-py's cluster client finds the rest). The namespace's
    # keys are spread over ``slot_groups`` hash tags (memory_store.redis_store.groups); None: one group
    # on a single Redis, ``CLUSTER_SLOT_GROUPS`` on a cluster. Fixed for a namespace's lifetime.
    redis_cluster: bool = False
    slot_groups: int | None = None
    # Redis: after each write, wait until this many Redis replicas acknowledged it (WAIT); 0 does not
    # wait. Without it a failover can lose writes the store had already acknowledged.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    data_dir: Path | None = None
    capacity: int | None = None
    user_capacity: int | None = None
    # Memories whose timestamp is more than this many seconds old are evicted (memory_store.retention);
    # None keeps them whatever their age.
    max_age_s: float | None = None
    user_memory_capacity: int = 32
    history_len: int = 200
    recent_width: int = 0
    state_window: int = 0
    first_new_item: int = 1
    dedup_ttl_s: int = 7 * 24 * 3600
    index: IndexParams = field(default_factory=IndexParams)
    quality: QualityFn = recency_frequency_quality
    # Redis backend: stream length kept (entries, approximate trim), connect retries, visibility wait.
    stream_maxlen: int = 1_000_000
    connect_attempts: int = 5
    connect_backoff_s: float = 0.2
    read_your_writes: bool = True
    visibility_timeout_s: float = 5.0
    # Embedded backend: fsync the log on every write (durable against power loss, slower).
    fsync: bool = False
    # The interaction log (every accepted interaction, for retraining): rows accepted longer ago than
    # this many seconds are dropped, on write and from reads; None keeps them for ever.
    log_retention_s: float | None = None

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not _NAMESPACE_RE.match(self.namespace):
            raise ValueError(f"namespace must match {_NAMESPACE_RE.pattern}, got {self.namespace!r}")
        for name in ("capacity", "user_capacity"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        for name, minimum in _MINIMA:
            value = getattr(self, name)
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if self.state_window > self.history_len:
            raise ValueError(f"state_window ({self.state_window}) exceeds history_len ({self.history_len})")
        if self.redis_tls_ca_file is not None and not (self.redis_url or "").startswith("rediss://"):
            raise ValueError("redis_tls_ca_file needs a rediss:// URL (TLS)")
        _check_cluster(self)
        if self.redis_url is None and self.data_dir is None:
            raise ValueError("the embedded backend (no redis_url) needs a data_dir")
        _check_retention(self.log_retention_s)
        _check_retention(self.max_age_s, "max_age_s")

    @property
    def groups(self) -> int:
        """The namespace's hash-tag groups: ``slot_groups``, or its default for the deployment."""
        if self.slot_groups is not None:
            return self.slot_groups
        return CLUSTER_SLOT_GROUPS if self.redis_cluster else 1


def _check_cluster(config: StoreConfig) -> None:
    if config.slot_groups is not None and not 1 <= config.slot_groups <= 256:
        raise ValueError(f"slot_groups must be in 1..256 or None, got {config.slot_groups}")
    if config.redis_wait_replicas < 0 or config.redis_wait_timeout_ms < 0:
        raise ValueError("redis_wait_replicas and redis_wait_timeout_ms must be >= 0")


def _check_retention(seconds: float | None, name: str = "log_retention_s") -> None:
    if seconds is not None and not seconds > 0:
        raise ValueError(f"{name} must be > 0 or None (keep for ever), got {seconds}")
