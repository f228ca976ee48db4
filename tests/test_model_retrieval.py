"""The collaborative memory bank (leakage rule, empty slots) and the fusion module on tiny known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import offline
from model.adaptive import AdaptiveKConfig, adaptive_k, k_from_entropy, normalised_entropy, recent_distinct
from model.fusion import FusionConfig, RetrievalFusion
from model.inference import InferenceConfig
from model.memory import BankHits, MemoryBank
from model.predictor import Plan, Predictor
from model.sasrec import EncoderConfig, SASRec


def unit(angle_deg: float) -> list[float]:
    a = np.deg2rad(angle_deg)
    return [float(np.cos(a)), float(np.sin(a))]


def search(
    bank: MemoryBank,
    q: np.ndarray,
    users: np.ndarray,
    prefix_lens: np.ndarray,
    k: int,
    fetch_factor: int = 4,
    own: bool = True,
) -> BankHits:
    """The offline retrieval (model.offline.nearest): the bank's candidates through the predictor's
    selection rules; ``own=False`` is the cross-user rule."""
    cfg = InferenceConfig(k=k, fetch_factor=fetch_factor, cross_user=not own)
    encoder = SASRec(EncoderConfig(n_items=20, max_len=4, dim=2, n_heads=1, inner_dim=4))
    predictor = Predictor(encoder, RetrievalFusion(FusionConfig(dim=2, n_heads=1, inner_dim=4)), cfg)
    n = len(q)
    plan = Plan(n, np.arange(n), q, np.full(n, k), np.zeros((n, 5), np.int64), users, prefix_lens, 0)
    return offline.nearest(predictor, bank, plan, k)


@pytest.fixture
def bank() -> MemoryBank:
    # Five memories on the unit circle: similarity to a query at 0° falls with the angle.
    keys = np.array([unit(0), unit(10), unit(20), unit(30), unit(90)], dtype=np.float32) * 3.0  # raw scale
    items = np.array([11, 12, 13, 14, 15])
    users = np.array([0, 0, 0, 1, 1])
    prefix_lens = np.array([1, 2, 3, 1, 2])
    return MemoryBank(keys, items, users, prefix_lens)


def test_search_is_cosine_and_drops_own_future(bank: MemoryBank) -> None:
    q = np.array([unit(0)], dtype=np.float32) * 0.1  # scale does not matter: cosine
    # user 0 at prefix 2 may see its own prefix-1 memory (id 0) but not prefixes 2 and 3 (ids 1, 2)
    r = search(bank, q, users=np.array([0]), prefix_lens=np.array([2]), k=3)
    assert r.ids.tolist() == [[0, 3, 4]]
    np.testing.assert_allclose(r.scores[0], [1.0, np.cos(np.deg2rad(30)), 0.0], atol=1e-6)
    # another user sees everything, best first
    r = search(bank, q, users=np.array([7]), prefix_lens=np.array([5]), k=3)
    assert r.ids.tolist() == [[0, 1, 2]]


def test_cross_user_search_skips_every_own_memory(bank: MemoryBank) -> None:
    q = np.array([unit(0)], dtype=np.float32)
    r = search(bank, q, users=np.array([0]), prefix_lens=np.array([9]), k=3, own=False)
    assert r.ids.tolist() == [[3, 4, -1]]  # user 0's memories 0, 1, 2 are all skipped


def test_fewer_survivors_than_k_are_padded_and_masked(bank: MemoryBank) -> None:
    q = np.array([unit(0)], dtype=np.float32)
    # user 0 at prefix 1 loses all three of its memories; fetch 4·2 = all 5; two survive
    r = search(bank, q, users=np.array([0]), prefix_lens=np.array([1]), k=4)
    assert r.ids.tolist() == [[3, 4, -1, -1]]
    assert (r.ids >= 0).tolist() == [[True, True, False, False]]
    assert np.isneginf(r.scores[0, 2:]).all()
    # a bank smaller than k pads too
    r = search(bank, q, users=np.array([9]), prefix_lens=np.array([1]), k=8)
    assert r.ids.shape == (1, 8) and (r.ids[0, 5:] == -1).all()


def test_fetch_window_limits_what_survives(bank: MemoryBank) -> None:
    q = np.array([unit(0)], dtype=np.float32)
    # k=1, fetch_factor=2 looks at the 2 nearest (ids 0, 1), both leaked for user 0 at prefix 1
    r = search(bank, q, users=np.array([0]), prefix_lens=np.array([1]), k=1, fetch_factor=2)
    assert r.ids.tolist() == [[-1]]


def test_bank_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        MemoryBank(np.zeros((2, 4), np.float32), np.array([1]), np.array([0, 0]), np.array([1, 2]))
    with pytest.raises(ValueError, match="finite"):
        MemoryBank(np.full((1, 4), np.nan, np.float32), np.array([1]), np.array([0]), np.array([1]))


def _inputs(b: int = 3, k: int = 4, d: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, d, generator=g)
    keys = torch.randn(b, k, d, generator=g)
    values = torch.randn(b, k, d, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False, False, False, False]])
    sims = torch.rand(b, k, generator=g)
    return h, keys, values, mask, sims


@pytest.mark.parametrize(
    "overrides",
    [{}, {"residual_norm": True}, {"gate": True}, {"similarity_bias": True}, {"beta": 0.5}],
)
def test_fusion_shapes_masking_and_empty_rows(overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    fusion = RetrievalFusion(FusionConfig(dim=8, inner_dim=16, **overrides)).eval()  # type: ignore[arg-type]
    h, keys, values, mask, sims = _inputs()
    out = fusion(h, keys, values, mask, sims)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out[2], h[2])  # no memory at all: ĥ = h
    assert not torch.allclose(out[:2], h[:2])  # memories change the state
    # what sits in a masked slot does not matter
    keys2, values2, sims2 = keys.clone(), values.clone(), sims.clone()
    keys2[0, 2:] += 100.0
    values2[0, 2:] -= 50.0
    sims2[0, 2:] = 0.9
    torch.testing.assert_close(fusion(h, keys2, values2, mask, sims2)[0], out[0])


def test_alpha_one_keeps_h_and_gate_is_capped() -> None:
    h, keys, values, mask, sims = _inputs()
    fusion = RetrievalFusion(FusionConfig(dim=8, inner_dim=16, alpha=1.0)).eval()
    torch.testing.assert_close(fusion(h, keys, values, mask, sims), h)
    gated = RetrievalFusion(FusionConfig(dim=8, inner_dim=16, gate=True, gate_cap=0.3)).eval()
    with torch.no_grad():
        gated.gate.bias.fill_(50.0)  # type: ignore[union-attr]  # saturate: g = cap
        r = gated.seq_tar(h, keys, values, mask, sims)
    torch.testing.assert_close(gated(h, keys, values, mask, sims)[:2], (0.7 * h + 0.3 * r)[:2])


def test_entropy_is_high_for_diverse_and_low_for_focused_memories() -> None:
    diverse = torch.eye(4)[None]  # four orthogonal items: every off-diagonal similarity equal
    focused = torch.tensor([[[8.0, 0.0], [8.0, 0.1], [0.0, 8.0], [0.1, 8.0]]])  # two tight pairs
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert float(normalised_entropy(diverse, mask)) == pytest.approx(1.0)
    # the softmax mass sits on the 4 within-pair entries of 12 (similarity 64 vs ≤ 0.8): Ĥ ≈ ln 4 / ln 12
    assert float(normalised_entropy(focused, mask)) == pytest.approx(math.log(4) / math.log(12), abs=1e-3)
    # fewer than two items: Ĥ = 0.5 by definition; padding rows are ignored
    padded = torch.cat([torch.eye(4)[None, :1], torch.zeros(1, 3, 4)], dim=1)
    assert float(normalised_entropy(padded, torch.tensor([[True, False, False, False]]))) == 0.5


def test_k_follows_the_published_rule() -> None:
    cfg = AdaptiveKConfig(k_base=20, k_min=3, k_max=20)
    h = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2])
    n = torch.tensor([100, 100, 36, 2, 400])
    # int(20·1.5·1) = 30 → 20; int(20·0.5·1) = 10; int(20·1.0·0.6) = 12; n = 2 caps at 2; int(20·0.7) = 14
    assert k_from_entropy(h, n, cfg).tolist() == [20, 10, 12, 2, 14]
    # the lower clip: a focused user with a short history still retrieves k_min
    assert k_from_entropy(torch.tensor([0.0]), torch.tensor([10]), cfg).tolist() == [3]


def test_recent_distinct_keeps_the_latest_occurrences() -> None:
    assert recent_distinct(np.array([5, 6, 5, 7, 6, 8]), capacity=3).tolist() == [7, 6, 8]
    assert recent_distinct(np.array([5, 6, 5, 7, 6, 8]), capacity=10).tolist() == [5, 7, 6, 8]
    assert recent_distinct(np.array([5, 6, 5, 7, 6, 8]), capacity=2).tolist() == [6, 8]


def test_adaptive_k_over_histories_and_depth_limit() -> None:
    emb = torch.eye(6) * 5.0  # item i ≥ 1 is the unit vector e_i: every pair orthogonal, Ĥ = 1
    ks = adaptive_k(emb, [np.array([1, 2, 3, 4, 5]), np.array([2]), np.array([3, 3, 3])], AdaptiveKConfig())
    # n = 5: int(20·1.5·sqrt(0.05)) = 6 → capped at n = 5; n = 1 → 1; repeats collapse to one item → 1
    assert ks.tolist() == [5, 1, 1]


def test_the_fusion_reads_each_querys_first_depth_memories(bank: MemoryBank) -> None:
    q = np.array([unit(0), unit(0)], dtype=np.float32)
    hits = search(bank, q, np.array([7, 7]), np.array([9, 9]), k=4)  # ids 0, 1, 2, 3 for both
    cfg = InferenceConfig(k=4)
    encoder = SASRec(EncoderConfig(n_items=20, max_len=4, dim=2, n_heads=1, inner_dim=4))
    predictor = Predictor(encoder, RetrievalFusion(FusionConfig(dim=2, n_heads=1, inner_dim=4)), cfg)
    plan = Plan(2, np.arange(2), q, np.array([2, 3]), np.zeros((2, 5), np.int64), None, None, 4)
    mem = predictor.memories(plan, hits)  # adaptive K of 2 and 3
    assert mem.present.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert mem.items.tolist() == [[11, 12, 0, 0], [11, 12, 13, 0]]
    assert mem.sims[0, 2:].tolist() == [0.0, 0.0]
