"""Parity: the service's ranking equals the offline evaluator's (``RetrievalModel``) for the same history
and memory bank, with an exact index; and a micro-batched answer equals the answer served alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from test_service_support import model_dir, running_app, toy_root, train_toy_model  # noqa: F401

from model import artifact
from model.adaptive import adaptive_k
from model.finetune import FinetuneConfig, RetrievalModel, limit_depth

HISTORIES = [
    ["i3", "i4", "i5"],
    ["i10"],
    ["i39", "i0", "i1", "i2", "i17", "i18"],
    [f"i{i}" for i in range(30)],
]


def offline_ranking(model_path: Path, history: list[str], n: int) -> tuple[list[str], np.ndarray, int]:
    art = artifact.load(model_path)
    assert art.fusion is not None and art.bank is not None
    cfg = FinetuneConfig(**art.finetune_config)
    model = RetrievalModel(art.encoder, art.fusion, art.bank, cfg)
    ids = np.array([art.vocab.item_id(i) for i in history], dtype=np.int64)
    with torch.inference_mode():
        state = art.encoder.encode(torch.from_numpy(ids[None, :]), torch.tensor([len(ids)]))
        # A user the bank does not know: the leakage rule removes nothing.
        retrieved = art.bank.search(
            state.numpy(), np.array([-1]), np.array([len(ids)]), cfg.k, cfg.fetch_factor
        )
        adaptive = cfg.adaptive()
        if adaptive is not None:
            retrieved = limit_depth(retrieved, adaptive_k(art.encoder.item_emb.weight, [ids], adaptive))
        scores = model.scores(state, retrieved)[0].clone()
        scores[torch.from_numpy(ids)] = -torch.inf  # exclude_seen
        top = torch.topk(scores, n)
    items = [art.vocab.external_item(int(i)) for i in top.indices]
    return items, top.values.numpy(), int(retrieved.mask.sum())


@pytest.fixture(scope="session")
def adaptive_model_dir(toy_root: Path) -> Path:  # noqa: F811
    return train_toy_model(toy_root, "adaptive", "--adaptive-k", "--k", "8")


@pytest.mark.parametrize("which", ["fixed-k", "adaptive-k"])
async def test_service_ranking_equals_offline(
    which: str,
    model_dir: Path,  # noqa: F811
    adaptive_model_dir: Path,
    tmp_path: Path,
) -> None:
    path = model_dir if which == "fixed-k" else adaptive_model_dir
    async with running_app(model_dir=path, store_dir=tmp_path / "s", exact_threshold=1_000_000) as (
        _,
        client,
    ):
        for k, history in enumerate(HISTORIES):
            want_items, want_scores, want_k = offline_ranking(path, history, 10)
            req = {"user_id": f"parity-{k}", "history": history, "n": 10}
            body = (await client.post("/recommend", json=req)).json()
            assert [it["item_id"] for it in body["items"]] == want_items
            np.testing.assert_allclose(
                [it["score"] for it in body["items"]], want_scores, rtol=1e-4, atol=1e-4
            )
            assert body["k_used"] == want_k


async def test_micro_batched_answers_equal_single_answers(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    settings = {"model_dir": model_dir, "store_dir": tmp_path / "s", "batch_max_wait_ms": 20.0}
    async with running_app(**settings) as (app, client):
        reqs = [{"user_id": f"u{i}", "n": 10, "history": HISTORIES[i % 4]} for i in range(12)]
        alone = [(await client.post("/recommend", json=r)).json() for r in reqs]
        together = await asyncio.gather(*(client.post("/recommend", json=r) for r in reqs))
        for a, b in zip(alone, together, strict=True):
            assert [it["item_id"] for it in a["items"]] == [it["item_id"] for it in b.json()["items"]]
            np.testing.assert_allclose(
                [it["score"] for it in a["items"]], [it["score"] for it in b.json()["items"]], atol=1e-4
            )
        text = (await client.get("/metrics")).text
        sizes = [line for line in text.splitlines() if line.startswith("memrec_batch_size_sum")]
        count = [line for line in text.splitlines() if line.startswith("memrec_batch_size_count")]
        assert float(sizes[0].split()[1]) == 24.0 and float(count[0].split()[1]) < 24.0  # some were fused
