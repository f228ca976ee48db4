"""The learned retriever on tiny known cases: the memory-token fusion, the long-term memory cut, the
labels, the KL objective, learning a known usefulness, and the selection rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.retriever import (
    Labelled,
    LongTermMemory,
    Retriever,
    RetrieverConfig,
    candidate_rows,
    compare_rules,
    fusion_labels,
    kl_to_labels,
    lower_window,
    select,
    train_retriever,
    upper_with_memories,
)
from model.data import Samples, leave_one_out, load_dataset
from model.evaluate import head_items
from model.sasrec import EncoderConfig, SASRec
from model.train import TrainConfig, evaluate_encoder

D = 16


def encoder(seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(EncoderConfig(n_items=30, dim=D, n_heads=2, n_layers=2, max_len=6, dropout=0.0)).eval()


def samples(rows: list[list[int]], targets: list[int], users: list[int], prefix_lens: list[int]) -> Samples:
    inputs = np.zeros((len(rows), 6), np.int64)
    for i, r in enumerate(rows):
        inputs[i, : len(r)] = r
    return Samples(
        inputs,
        np.asarray([len(r) for r in rows], np.int64),
        np.asarray(targets, np.int64),
        np.asarray(users, np.int64),
        np.asarray(prefix_lens, np.int64),
    )


def test_masked_memories_leave_the_encoder_unchanged_and_real_ones_change_it() -> None:
    enc = encoder()
    s = samples([[1, 2, 3], [4, 5, 6, 7, 8]], [9, 10], [0, 1], [3, 5])
    idx = np.arange(2)
    with torch.no_grad():
        x, items = lower_window(enc, s, idx, 1, "cpu")
        lengths = torch.from_numpy(s.lengths)
        plain = enc.encode(items, lengths)
        mem = torch.randn(2, 3, D)
        off = upper_with_memories(enc, x, items, lengths, mem, torch.zeros(2, 3, dtype=torch.bool), 1)
        on = upper_with_memories(enc, x, items, lengths, mem, torch.ones(2, 3, dtype=torch.bool), 1)
    torch.testing.assert_close(off, plain, rtol=1e-5, atol=1e-5)
    assert (on - plain).abs().max() > 1e-3


def test_long_term_memory_is_what_the_window_no_longer_shows() -> None:
    # rows 0-7: user 0's training prefixes of lengths 1..8; rows 8-9: user 1's of lengths 1..2; window 3.
    plens = [*range(1, 9), 1, 2]
    states = np.arange(1, 11, dtype=np.float32)[:, None].repeat(D, 1)  # all the same direction
    memory = LongTermMemory(states, np.asarray(plens, np.int64), np.asarray([0, 8, 10], np.int64))
    assert memory.of(0, 9, 3).tolist() == list(range(6))  # window = positions 6..8: prefixes ≤ 6
    assert memory.of(0, 4, 3).tolist() == [0]
    assert memory.of(0, 3, 3).size == 0
    assert memory.of(1, 5, 3).tolist() == [8, 9]
    assert memory.of(7, 5, 3).size == 0  # an unknown user has none
    q = samples([[1]], [2], [0], [9])
    cand = candidate_rows(memory, np.ones((1, D), np.float32), q, 3, 4)
    assert cand.shape == (1, 4) and set(cand[0].tolist()) <= set(range(6))
    padded = candidate_rows(memory, np.ones((1, D), np.float32), samples([[1]], [2], [0], [5]), 3, 4)
    assert padded[0].tolist() == [0, 1, -1, -1]  # two memories (prefixes 1, 2); equal cosines keep order
    farther = candidate_rows(memory, -np.ones((1, D), np.float32), q, 3, 6)
    assert sorted(farther[0].tolist()) == list(range(6))


def test_labels_are_the_cross_entropy_saved_by_each_candidate() -> None:
    enc = encoder(1)
    rng = np.random.default_rng(0)
    memory = LongTermMemory(
        rng.standard_normal((5, D)).astype(np.float32), np.arange(1, 6), np.asarray([0, 5])
    )
    s = samples([[3, 4, 5]], [7], [0], [9])
    cand = np.asarray([[4, 0, 2, -1]], np.int64)
    delta = fusion_labels(enc, s, memory, cand, 1, "cpu")
    assert np.isnan(delta[0, 3]) and not np.isnan(delta[0, :3]).any()
    with torch.no_grad():
        x, items = lower_window(enc, s, np.arange(1), 1, "cpu")
        lengths = torch.from_numpy(s.lengths)
        target = torch.tensor([7])
        ce0 = F.cross_entropy(enc.scores(enc.encode(items, lengths)), target)
        for j, row in enumerate(cand[0, :3]):
            mem = torch.from_numpy(memory.states[[row]])[None]
            h = upper_with_memories(enc, x, items, lengths, mem, torch.ones(1, 1, dtype=torch.bool), 1)
            assert delta[0, j] == pytest.approx(float(ce0 - F.cross_entropy(enc.scores(h), target)), abs=1e-5)


def test_kl_is_zero_exactly_at_the_labels() -> None:
    delta = torch.tensor([[1.0, 0.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    exact = F.log_softmax(torch.tensor([[1.0, 0.0, -1.0, -1e9]]), dim=1)
    assert float(kl_to_labels(exact, delta, mask, 1.0)) == pytest.approx(0.0, abs=1e-6)
    wrong = F.log_softmax(torch.tensor([[-1.0, 0.0, 1.0, -1e9]]), dim=1)
    assert float(kl_to_labels(wrong, delta, mask, 1.0)) > 0.5


def test_retriever_learns_a_known_usefulness_and_selection_follows_it() -> None:
    """Usefulness δ = 0.01·<u, memory> (hundredths of a nat, as on a frozen backbone) and unrelated to
    the query: the retriever must rank the truly best candidate first far more often than chance."""
    rng = np.random.default_rng(0)
    n, c = 3000, 8
    states = rng.standard_normal((n * c, D)).astype(np.float32)
    memory = LongTermMemory(states, np.ones(n * c, np.int64), np.asarray([0, n * c]))
    u = rng.standard_normal(D).astype(np.float32)
    queries = rng.standard_normal((n, D)).astype(np.float32)
    cand = np.arange(n * c).reshape(n, c)
    delta = (0.01 * states[cand] @ u).astype(np.float32)
    cut = int(0.8 * n)
    train = Labelled(queries[:cut], cand[:cut], delta[:cut])
    valid = Labelled(queries[cut:], cand[cut:], delta[cut:])
    retriever, history = train_retriever(memory, train, valid, D, RetrieverConfig(epochs=40, patience=40))
    assert history[-1] < 0.5 * history[0]
    s = samples([[1]] * (n - cut), [2] * (n - cut), [0] * (n - cut), [1] * (n - cut))
    learned = select("learned", memory, s, valid, 1, 50, retriever, rng, "cpu")[:, 0]
    best = cand[cut:][np.arange(n - cut), delta[cut:].argmax(1)]
    assert (learned == best).mean() > 0.6  # chance is 1/8
    similar = select("similarity", memory, s, valid, 2, 50, None, rng, "cpu")
    assert (similar == cand[cut:, :2]).all()
    assert (select("none", memory, s, valid, 3, 50, None, rng, "cpu") == -1).all()
    with pytest.raises(ValueError, match="unknown retrieval rule"):
        select("psychic", memory, s, valid, 1, 50, None, rng, "cpu")


def test_retriever_scores_only_real_candidates() -> None:
    r = Retriever(D, 8)
    log_s = r(
        torch.randn(2, D), torch.randn(2, 3, D), torch.tensor([[True, False, True], [True, True, True]])
    )
    assert torch.exp(log_s[0, 1]) < 1e-6 and torch.allclose(torch.exp(log_s).sum(1), torch.ones(2))


def test_compare_rules_end_to_end_on_long_histories(tmp_path: Path) -> None:
    """Histories longer than the window: every rule is evaluated on the queries with long-term memory,
    and the rule "none" is exactly the plain encoder on them."""
    rng = np.random.default_rng(0)
    lines = [
        f"u{u} " + " ".join(f"i{(u + 3 * j + rng.integers(2)) % 25}" for j in range(20)) for u in range(40)
    ]
    (tmp_path / "long.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset(str(tmp_path / "long.txt"))
    torch.manual_seed(0)
    enc = SASRec(EncoderConfig(n_items=data.vocab.n_items, dim=D, n_heads=2, n_layers=2, max_len=6)).eval()
    split = leave_one_out(data, 6)
    cfg = RetrieverConfig(candidates=4, k=2, epochs=3, max_train_queries=300)
    out = compare_rules(enc, split, cfg)
    queries = out["queries"]
    assert isinstance(queries, dict) and queries["test"] == queries["test_all"] == 40  # all have memory
    assert queries["train"] == 300
    test = out["test"]
    assert isinstance(test, dict) and set(test) == {"none", "similarity", "random", "learned"}
    plain = evaluate_encoder(enc, split.test, split.test_seen, TrainConfig(device="cpu"))
    for protocol in ("unmasked", "masked"):
        assert test["none"][protocol] == pytest.approx(plain[protocol])


def test_whole_test_figures_change_only_the_queries_with_long_term_memory(tmp_path: Path) -> None:
    """Half the users outgrow the window: on the whole test set "none" is exactly the plain encoder,
    and every other rule differs from it only through the queries that have long-term memory."""
    rng = np.random.default_rng(1)
    lines = [
        f"u{u} " + " ".join(f"i{(u + 3 * j + rng.integers(2)) % 25}" for j in range(20 if u < 20 else 5))
        for u in range(40)
    ]
    (tmp_path / "mixed.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset(str(tmp_path / "mixed.txt"))
    torch.manual_seed(0)
    # weights large enough that one memory token moves ranks (at the default 0.02 it barely does)
    cfg = EncoderConfig(n_items=data.vocab.n_items, dim=D, n_heads=2, n_layers=2, max_len=6, init_std=0.5)
    enc = SASRec(cfg).eval()
    split = leave_one_out(data, 6)
    out = compare_rules(enc, split, RetrieverConfig(candidates=4, k=2, epochs=3, max_train_queries=300))
    queries, sub, whole = out["queries"], out["test"], out["test_all"]
    assert isinstance(queries, dict) and (queries["test"], queries["test_all"]) == (20, 40)
    assert isinstance(sub, dict) and isinstance(whole, dict)
    head = head_items(split.train.targets, enc.cfg.n_items)
    plain = evaluate_encoder(enc, split.test, split.test_seen, TrainConfig(device="cpu"), head=head)
    assert whole["none"] == plain  # the same scores, so the same figures to the last bit
    assert {"unmasked_head", "unmasked_tail", "masked_head", "masked_tail"} <= set(whole["learned"])
    moved = False
    for rule in ("similarity", "random", "learned"):
        for protocol in ("unmasked", "masked"):
            for metric, value in whole[rule][protocol].items():
                # the 20 queries without memory add the same to the whole-set sum under every rule
                rest = 40 * value - 20 * sub[rule][protocol][metric]
                rest_plain = 40 * plain[protocol][metric] - 20 * sub["none"][protocol][metric]
                assert rest == pytest.approx(rest_plain)
                moved |= value != plain[protocol][metric]
    assert moved  # fused memories do move some whole-set figure: the rows above are not all "none"
