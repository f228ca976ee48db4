"""Request and response bodies of the HTTP API (separate types for each direction)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Text ids; pydantic rejects strings that are not valid Unicode (lone surrogates) with a 422.
UserId = str
ItemId = str


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId = Field(min_length=1, max_length=256)
    n: int = Field(default=10, ge=1, le=1_000, description="number of items to return")
    history: list[ItemId] | None = Field(
        default=None, description="items to append to the stored history for this request only"
    )
    exclude_seen: bool = Field(default=True, description="never recommend an item of the history")
    exclude_items: list[ItemId] | None = None
    explain: bool = Field(default=False, description="also return the memories that were used")


class FollowOut(BaseModel):
    item_id: ItemId = Field(description="one of the user's recent items")
    weight: float = Field(
        description="that item's share of the transition mass this item received (the shares of one "
        "item's follows add up to 1)"
    )


class ItemWhy(BaseModel):
    """Where an item's score comes from (``explain``). When the memory vote or the transition channel
    is on, the score is a log-probability and ``exp(score) == model + vote + transitions``; when both are
    off, ``model`` is the item's softmax probability and the other two are 0."""

    encoder_rank: int = Field(
        ge=1, description="1-based rank of the item by the plain encoder, without any memory"
    )
    model: float = Field(description="probability mass the model (encoder + fused memories) gives the item")
    vote: float = Field(description="probability mass the memory vote gives the item (0 when off)")
    transitions: float = Field(
        description="probability mass the transition channel gives the item (0 when off)"
    )
    memories: list[int] = Field(
        description="memory_ids, among the response's memories, whose next item is this item"
    )
    follows: list[FollowOut] = Field(
        description="which of the user's recent items this item followed in the transition counts"
    )


class ScoredItem(BaseModel):
    item_id: ItemId
    score: float
    why: ItemWhy | None = Field(
        default=None, description="where the score comes from; present only with explain: true"
    )


class MemoryOut(BaseModel):
    memory_id: int
    item_id: ItemId
    user_id: UserId
    similarity: float
    prefix_len: int
    timestamp: float
    available: bool = Field(
        default=True, description="false when item_id is marked unavailable (it is never recommended)"
    )


class RecommendResponse(BaseModel):
    user_id: UserId
    items: list[ScoredItem]
    k_used: int = Field(description="memories fused into the user's state (0: encoder or cold start)")
    model_version: str
    strategy: str = Field(description="'retrieval', 'encoder' or 'popular' (cold start)")
    degraded: bool = Field(
        default=False,
        description="the store was unreachable: ranked from the request's own history and this "
        "replica's index, without the stored history",
    )
    memories: list[MemoryOut] | None = None


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId = Field(min_length=1, max_length=256)
    item_id: ItemId = Field(min_length=1, max_length=256)
    timestamp: float | None = Field(
        default=None, allow_inf_nan=False, description="unix seconds; default: now"
    )
    event_id: str | None = Field(default=None, min_length=1, max_length=256, description="idempotency key")


class InteractionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1)


class InteractionsResponse(BaseModel):
    accepted: int
    duplicates: int


class AvailabilityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemId] = Field(min_length=1, description="item ids, all known to the service")
    available: bool = Field(description="false: never recommend them; true: they may be recommended again")


class AvailabilityResponse(BaseModel):
    items: int = Field(description="distinct items in the request")
    changed: int = Field(description="items whose availability this request changed")
    unavailable: int = Field(description="items unavailable now, in all")


class UnavailableItems(BaseModel):
    items: list[ItemId] = Field(description="every item marked unavailable")


class ErasureResponse(BaseModel):
    user_id: UserId
    history_items: int = Field(description="items of the user's history removed")
    memories: int = Field(description="memories built from the user's history removed from the bank")
    user_memories: int = Field(description="per-user memories removed")
    event_ids: int = Field(description="idempotency keys (event_id) of the user's events forgotten")
    interactions: int = Field(description="rows of the interaction log (what `memrec export` writes) removed")


class Problem(BaseModel):
    detail: str


class ReadyResponse(BaseModel):
    ready: bool
    checks: dict[str, str]
    model_version: str | None = None  # the primary version
    model_versions: list[str] = Field(default_factory=list, description="every version served, primary first")


class SwapResponse(BaseModel):
    outcome: str = Field(description="switched, current (the version served already) or failed")
    from_version: str
    to_version: str
    seconds: float = Field(description="from the check to the switch")
    replayed: int = Field(description="logged interactions stored into the new version")
    error: str | None = None
