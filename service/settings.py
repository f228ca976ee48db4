"""Service settings: one typed object read from the environment (prefix ``MEMREC_``) and the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from memory_store.config import IndexChoice

_NAMESPACE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
NewItemEmbeddingsMode = Literal["auto", "on", "off"]  # MEMREC_NEW_ITEM_EMBEDDINGS


class Settings(BaseSettings):
    """Everything the server reads at start-up. Environment names are the field names, upper-cased, with
    the ``MEMREC_`` prefix (``MEMREC_MODEL_DIR``, ``MEMREC_REDIS_URL``, ...)."""

    model_config = SettingsConfigDict(env_prefix="MEMREC_", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(description="model directory written by `memrec train`")
    redis_url: str | None = Field(default=None, description="Redis URL; unset: the embedded store")
    redis_password: SecretStr | None = Field(default=None, description="Redis password (wins over the URL's)")
    redis_tls_ca_file: Path | None = Field(default=None, description="CA bundle for a rediss:// (TLS) URL")
    redis_cluster: bool = Field(
        default=False, description="redis_url names a node of a Redis Cluster (keys spread over its masters)"
    )
    redis_slot_groups: int | None = Field(
        default=None, ge=1, le=256, description="hash-tag groups of a namespace; default 1, 16 on a cluster"
    )
    redis_wait_replicas: int = Field(
        default=0, ge=0, description="a write is acknowledged once this many Redis replicas hold it (WAIT)"
    )
    redis_wait_timeout_ms: int = Field(
        default=1_000, ge=0, description="how long a write waits for those replicas before a 503"
    )
    store_dir: Path = Field(default=Path("var/store"), description="embedded store's data folder")
    namespace: str | None = Field(default=None, description="store namespace; default: the model version")
    model_dir_b: Path | None = Field(
        default=None, description="a second model directory served side by side with model_dir (an A/B split)"
    )
    model_watch_s: float = Field(
        default=10.0, ge=0.0, description="seconds between checks of model_dir for a new model; 0: off"
    )
    swap_grace_s: float = Field(
        default=30.0, ge=0.0, description="seconds the old version keeps running after a hot swap"
    )
    swap_drop_old: bool = Field(
        default=True,
        description="after a hot swap, delete the old version's namespace if no process uses it",
    )
    share_b: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of users (by a hash of user_id) model_dir_b answers"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65_535)
    history_len: int = Field(default=50, ge=1, le=10_000, description="history items read per request")
    max_events_per_batch: int = Field(default=1_000, ge=1, description="events per POST /interactions")
    max_request_bytes: int = Field(default=1_000_000, ge=1_024, description="largest request body")
    max_request_items: int = Field(default=1_000, ge=1, description="history / exclude_items length cap")
    api_key: SecretStr | None = Field(
        default=None, description="when set, requests need it (X-API-Key or Authorization: Bearer)"
    )
    metrics_require_key: bool = Field(default=False, description="/metrics also needs the API key")
    capacity: int | None = Field(default=None, ge=1, description="most memories kept (oldest go)")
    user_capacity: int | None = Field(default=None, ge=1, description="most memories kept per user")
    memory_max_age_days: float | None = Field(
        default=None, gt=0.0, description="memories whose timestamp is older than this many days are evicted"
    )
    graceful_shutdown_s: float = Field(default=20.0, ge=0.0, description="drain time for in-flight requests")
    workers: int = Field(default=1, ge=1, le=64, description="server processes (more than 1 needs Redis)")
    worker_startup_grace_s: float = Field(
        default=60.0, gt=0.0, description="a worker dying sooner stops the server; later, it is restarted"
    )
    torch_threads: int = Field(default=1, ge=1, description="intra-op threads of torch and FAISS")
    batch_max_size: int = Field(default=64, ge=1, description="requests fused into one forward pass")
    batch_max_wait_ms: float = Field(default=3.0, ge=0.0, description="wait for more requests to batch")
    frozen_memory: bool = Field(default=False, description="interactions update histories, never memories")
    new_items: Literal["accept", "reject"] = Field(
        default="accept",
        description="item ids the model was not trained on: 'accept' registers them from /interactions, "
        "'reject' answers 422",
    )
    new_item_weight: float = Field(
        default=1.0,  # 5: on ml-100k's time-split replay no gain at the 80 % cut, a loss at the 50 % one
        gt=0.0,
        le=100.0,
        description="how much the transition counts of an item registered after training weigh against "
        "a trained item's: its counts cover only the time since it first appeared (1 = the same)",
    )
    new_item_embeddings: NewItemEmbeddingsMode = Field(
        default="auto",
        description="whether items registered after training get an embedding derived from the known items "
        "before them, so that the encoder and the fusion score them: 'auto' for a model with neither the "
        "memory vote nor the transition channel (then its only way to rank a new item) and for one that "
        "ranks with the learned hybrid (whose transition weights rarely lift an item the model cannot score)",
    )
    log_retention_days: float | None = Field(
        default=None,
        ge=0.0,
        description="days the interaction log keeps an accepted interaction (for `memrec export`); "
        "unset or 0: for ever",
    )
    load_bank: bool = Field(default=True, description="bulk-load the artifact's memories at start-up")
    snapshot_interval_s: float = Field(
        default=300.0, ge=0.0, description="seconds between index snapshots (also one at shutdown); 0: off"
    )
    loop_lag_interval_s: float = Field(
        default=0.05, ge=0.0, description="period of the event-loop lag probe (a histogram); 0: off"
    )
    exact_threshold: int = Field(default=50_000, ge=1, description="memories below which search is exact")
    index_kind: IndexChoice = Field(
        default="auto",
        description="what the IVF index keeps per memory: float32 (ivf_flat), half floats (ivf_fp16), 8-bit "
        "codes (ivf_sq8), or auto: ivf_flat below 1M memories, ivf_sq8 from 1M (reports/index_scale.md)",
    )
    nprobe: int = Field(
        default=16, ge=1, description="IVF lists scanned per query (recall against latency; reports/ann.md)"
    )
    frozen_graphs: bool = Field(
        default=True, description="serve encoder and fusion as frozen TorchScript graphs (kept only if exact)"
    )
    data_dir: Path | None = Field(
        default=None,
        description="datasets folder (as for `memrec train`); the page at /ui shows item titles from "
        "<data_dir>/<dataset>/<dataset>.item (RecBole) or <data_dir>/<dataset>/u.item (MovieLens) if there",
    )
    item_titles: Path | None = Field(
        default=None,
        description="item titles file for /ui: a MovieLens u.item or a RecBole .item; wins over data_dir",
    )
    device: str = "cpu"
    log_level: str = "info"

    @field_validator("api_key", "redis_password", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        # Compose and Kubernetes pass an unset optional secret as an empty string.
        return None if value == "" else value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str | None) -> str | None:
        if value is not None and (not value or _NAMESPACE_CHARS.search(value) or len(value) > 64):
            raise ValueError("namespace must be 1-64 characters of letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _check_model_dir(self) -> Settings:
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"model_dir {self.model_dir} holds no config.json (train with `memrec train`)")
        if self.redis_tls_ca_file is not None and not (self.redis_url or "").startswith("rediss://"):
            raise ValueError("redis_tls_ca_file needs a rediss:// redis_url")
        if self.model_dir_b is not None and not (self.model_dir_b / "config.json").is_file():
            raise ValueError(f"model_dir_b {self.model_dir_b} holds no config.json (a `memrec train` output)")
        if self.share_b > 0 and self.model_dir_b is None:
            raise ValueError("share_b > 0 needs model_dir_b: the second model version to answer that share")
        if (self.redis_cluster or self.redis_wait_replicas) and self.redis_url is None:
            raise ValueError("redis_cluster and redis_wait_replicas need redis_url")
        if self.workers > 1 and self.redis_url is None:
            raise ValueError("workers > 1 needs redis_url: the embedded store belongs to one process")
        return self

    def store_namespace(self, model_version: str, second: bool = False) -> str:
        """The namespace to use: the setting, else the model version made namespace-safe. The second of
        two versions side by side (``second``) always has its own: its setting's with ``-b`` appended."""
        if self.namespace is not None:
            return f"{self.namespace[:62]}-b" if second else self.namespace
        return _NAMESPACE_CHARS.sub("_", model_version)[:64] or "default"
