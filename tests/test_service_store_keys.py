"""The store feature the service relies on: ``search(..., with_keys=True)`` returns each hit's stored
unit key (what fusion attends over), on both backends, with zeros at padding."""

from __future__ import annotations

from typing import Any

import numpy as np

from memory_store import MemoryBatch


async def test_search_returns_the_stored_unit_keys(store: Any) -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(6, 8)).astype(np.float32) * 3.0
    batch = MemoryBatch.create(raw, [1, 2, 3, 4, 5, 6], ["a"] * 6, [0.0] * 6, [1] * 6, dim=8)
    await store.add_memories(batch)
    res = await store.search(raw[:2], k=8, with_keys=True)
    assert res.keys is not None and res.keys.shape == (2, 8, 8)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    for row in range(2):
        for col in range(8):
            item = int(res.items[row, col])
            expected = unit[item - 1] if res.ids[row, col] >= 0 else np.zeros(8, np.float32)
            np.testing.assert_allclose(res.keys[row, col], expected, atol=1e-6)
    assert res.ids[0, 0] >= 0 and res.items[0, 0] == 1  # a key finds itself first
    assert (await store.search(raw[:1], k=2)).keys is None  # not asked: not gathered
