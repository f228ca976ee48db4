"""Training: the InfoNCE term by hand, learning a known pattern, seeds, and exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import Interactions, Split, Vocab, leave_one_out
from model.sasrec import EncoderConfig, SASRec
from model.train import TrainConfig, encode_by_length, evaluate_encoder, info_nce, train


def test_info_nce_by_hand() -> None:
    # Two orthonormal pairs: each row's positive has similarity 1, its two negatives 0.
    a = torch.eye(2)
    assert float(info_nce(a, a.clone())) == pytest.approx(math.log((math.e + 2) / math.e))
    # Temperature divides the similarities.
    assert float(info_nce(a, a.clone(), temperature=0.5)) == pytest.approx(
        math.log((math.e**2 + 2) / math.e**2)
    )


def cyclic_split(n_users: int = 150, n_items: int = 12, length: int = 9, seed: int = 0) -> Split:
    """Every user walks the item cycle 1 → 2 → … → n → 1 from a random start: next item is learnable."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_items, size=n_users)
    seqs = [((s + np.arange(length)) % n_items + 1).astype(np.int64) for s in starts]
    vocab = Vocab([f"u{u}" for u in range(n_users)], [str(i) for i in range(1, n_items + 1)])
    return leave_one_out(Interactions("cyclic", vocab, seqs), max_len=6)


def tiny_encoder(n_items: int = 12, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(
        EncoderConfig(n_items=n_items, max_len=6, dim=16, inner_dim=32, dropout=0.1, attn_dropout=0.1)
    )


@pytest.mark.parametrize(
    ("objective", "scheme"), [("sasrec", "prefix"), ("pretrain", "prefix"), ("sasrec", "allpos")]
)
def test_learns_a_cyclic_pattern(objective: str, scheme: str) -> None:
    split = cyclic_split()
    model = tiny_encoder()
    cfg = TrainConfig(objective=objective, scheme=scheme, epochs=15, batch_size=64, lr=5e-3, patience=15)
    untrained = evaluate_encoder(model, split.test, split.test_seen, cfg)["unmasked"]["ndcg@5"]
    result = train(model, split, cfg)
    test = evaluate_encoder(model, split.test, split.test_seen, cfg)["unmasked"]
    assert untrained < 0.5
    assert test["ndcg@5"] > 0.95, (untrained, test)  # the target ranks first almost always
    assert result.best_valid["unmasked"]["ndcg@10"] > 0.95


def _weights(model: SASRec) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    split = cyclic_split()
    runs = []
    for seed in (3, 3, 4):
        model = tiny_encoder(seed=seed)
        result = train(model, split, TrainConfig(objective="pretrain", epochs=2, batch_size=64, seed=seed))
        runs.append((_weights(model), [e.loss for e in result.history]))
    (w0, l0), (w1, l1), (w2, l2) = runs
    assert l0 == l1 and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert l0 != l2


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    split = cyclic_split()
    cfg = TrainConfig(objective="pretrain", epochs=4, batch_size=64, seed=1, patience=100)
    straight = tiny_encoder(seed=1)
    expected = train(straight, split, cfg)

    first = tiny_encoder(seed=1)
    half = train(first, split, TrainConfig(**{**cfg.to_json(), "epochs": 2}), checkpoint_dir=tmp_path)
    resumed = tiny_encoder(seed=99)  # a fresh process's model: its weights come from the checkpoint
    result = train(resumed, split, cfg, checkpoint_dir=tmp_path)

    assert [e.loss for e in result.history] == [e.loss for e in expected.history]
    assert result.best_epoch == expected.best_epoch
    assert all(torch.equal(v, straight.state_dict()[k]) for k, v in resumed.state_dict().items())
    # the reported training time counts the first session's epochs too, validation included
    assert all(e.valid_seconds > 0 for e in result.history)
    later = sum(e.seconds + e.valid_seconds for e in result.history[2:])
    assert result.train_seconds == pytest.approx(half.train_seconds + later)


def test_early_stopping_keeps_the_best_epoch() -> None:
    split = cyclic_split()
    model = tiny_encoder()
    result = train(
        model, split, TrainConfig(objective="sasrec", epochs=40, batch_size=64, lr=5e-3, patience=2)
    )
    assert len(result.history) < 40  # stopped early
    assert len(result.history) - result.best_epoch == 2  # exactly `patience` epochs past the best
    final = evaluate_encoder(model, split.valid, split.valid_seen, TrainConfig())
    assert final == result.best_valid  # the model holds the best epoch's weights


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(objective="bpr")


def test_length_chunked_encoding_equals_one_padded_pass() -> None:
    split = cyclic_split(n_users=40, length=12)
    model = tiny_encoder().eval()
    idx = np.random.default_rng(0).permutation(len(split.train))[:50]
    x = torch.from_numpy(split.train.inputs[idx])
    lengths = torch.from_numpy(split.train.lengths[idx])
    with torch.no_grad():
        expected = model.encode(x, lengths)
        got = encode_by_length(model, split.train, idx, torch.device("cpu"), chunks=3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
