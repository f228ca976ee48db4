"""External ↔ internal item ids: the model's vocabulary (ids 1..n_items) and the store's registry of the
items first seen after training (ids n_items + 1, …, shared by every replica), with a 422 that names
every unknown item.

How an item id neither knows is treated depends on ``MEMREC_NEW_ITEMS`` and on what the request does:

=================================  ==========================  =====================================
where                              ``accept`` (default)        ``reject``
=================================  ==========================  =====================================
``/interactions`` events (writes)  registered, then stored     422, nothing stored
``/recommend`` history, exclusions skipped (a read registers   422
                                   nothing; an item nobody
                                   saw cannot be scored)
``PUT /items/availability``        422                         422
=================================  ==========================  =====================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fastapi import HTTPException

from memory_store import MemoryStore
from model.data import Vocab


def unknown_items_error(unknown: Sequence[str], field: str) -> HTTPException:
    """A 422 naming the first 20 ``unknown`` ids and how many there are."""
    shown = ", ".join(repr(u) for u in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
    return HTTPException(422, f"unknown item ids in {field}: {shown} ({len(unknown)} unknown)")


def internal_items(vocab: Vocab, externals: Sequence[str], field: str) -> list[int]:
    """The vocabulary's ids of ``externals``; a 422 naming every id it does not hold."""
    unknown = sorted({e for e in externals if not vocab.has_item(e)})
    if unknown:
        raise unknown_items_error(unknown, field)
    return [vocab.item_id(e) for e in externals]


@dataclass(frozen=True)
class ItemNames:
    """One version of the mapping: the vocabulary and the registry as the store had it."""

    vocab: Vocab
    registered: Mapping[str, int]  # external → internal, the new items
    by_id: Mapping[int, str]  # internal → external, the new items

    def internal(self, external: str) -> int | None:
        """The internal id, or None for an item neither the model nor the registry knows."""
        if self.vocab.has_item(external):
            return self.vocab.item_id(external)
        return self.registered.get(external)

    def external(self, internal: int) -> str:
        """The external id; KeyError for an id neither knows (another model version's)."""
        if internal <= self.vocab.n_items:
            return self.vocab.external_item(internal)
        return self.by_id[internal]

    def unknown(self, externals: Sequence[str]) -> list[str]:
        """The ids of ``externals`` neither knows, sorted, each once."""
        return sorted({e for e in externals if self.internal(e) is None})


class ItemIds:
    """The service's item ids; ``accept_new``: ``MEMREC_NEW_ITEMS=accept`` (see the module's table)."""

    def __init__(self, vocab: Vocab, store: MemoryStore, accept_new: bool) -> None:
        self.vocab = vocab
        self.store = store
        self.accept_new = accept_new
        self._names = ItemNames(vocab, {}, {})

    async def names(self) -> ItemNames:
        """The current mapping; the reverse of the registry is rebuilt only when the store's changed."""
        registered = await self.store.new_items()
        if registered is not self._names.registered:
            by_id = {i: name for name, i in registered.items()}
            self._names = ItemNames(self.vocab, registered, by_id)
        return self._names

    async def known(self, externals: Sequence[str], field: str) -> list[int]:
        """Internal ids of items the service knows; a 422 naming the others, whatever the mode."""
        names = await self.names()
        unknown = names.unknown(externals)
        if unknown:
            raise unknown_items_error(unknown, field)
        return [self._id(names, e) for e in externals]

    async def those_known(self, externals: Sequence[str]) -> list[int]:
        """Internal ids of the items of ``externals`` this version knows, the others skipped (another
        model version side by side may know items this one never saw)."""
        names = await self.names()
        return [i for e in externals if (i := names.internal(e)) is not None]

    async def read(self, externals: Sequence[str], field: str) -> list[int]:
        """Internal ids for a read (a request's history or exclusions): unknown items are skipped in
        ``accept`` mode, a 422 in ``reject`` mode."""
        if not self.accept_new:
            return await self.known(externals, field)
        return await self.those_known(externals)

    async def write(self, externals: Sequence[str], field: str, accept: bool | None = None) -> list[int]:
        """Internal ids for stored events: unknown items are registered in ``accept`` mode (one id per
        item whichever replica registers it first), a 422 in ``reject`` mode (nothing is stored).
        ``accept`` overrides the mode (a version being moved to takes what the serving one took)."""
        names = await self.names()
        unknown = names.unknown(externals)
        if unknown and not (self.accept_new if accept is None else accept):
            raise unknown_items_error(unknown, field)
        fresh = dict(zip(unknown, await self.store.register_items(unknown), strict=True)) if unknown else {}
        return [fresh[e] if e in fresh else self._id(names, e) for e in externals]

    @staticmethod
    def _id(names: ItemNames, external: str) -> int:
        internal = names.internal(external)
        assert internal is not None  # checked by the caller
        return internal
