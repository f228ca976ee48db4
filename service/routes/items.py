"""External ↔ internal item ids, with a 422 that names every unknown item."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import HTTPException

from model.data import Vocab


def internal_items(vocab: Vocab, externals: Sequence[str], field: str) -> list[int]:
    unknown = sorted({e for e in externals if not vocab.has_item(e)})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise HTTPException(422, f"unknown item ids in {field}: {shown} ({len(unknown)} unknown)")
    return [vocab.item_id(e) for e in externals]
