"""The parameter-free baselines (bench.baselines) on a hand-made data set, ranks worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import baselines, retrieval, transition_mix
from bench.common import GROUPS, METRICS, PROTOCOLS
from model.data import Interactions, Split, Vocab, leave_one_out
from model.evaluate import mask_seen, metrics_from_ranks, target_ranks

N_IDS = 6  # items 1..5, 0 = padding


def toy_split() -> Split:
    """Three users over items 1..5:

    u0: 1 2 3 4    training 1→2; validation 1 2→3; test 1 2 3→4
    u1: 1 2 3 5    training 1→2; validation 1 2→3; test 1 2 3→5
    u2: 2 3 4 5 3  training 2→3, 2 3→4; validation 2 3 4→5; test 2 3 4 5→3 (3 seen before: a repeat)

    The bank (training + validation pairs): 1→2 twice, 1 2→3 twice, 2→3, 2 3→4, 2 3 4→5. Target counts
    (popularity): item 1: 0, 2: 2, 3: 3, 4: 1, 5: 1. Followers at lag 1: 1→2 ×2, 2→3 ×3, 3→4, 4→5; lag 2:
    1→3 ×2, 2→4, 3→5; lag 3: 2→5."""
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [2, 3, 4, 5, 3]]
    data = Interactions(
        "toy", Vocab(["u0", "u1", "u2"], ["a", "b", "c", "d", "e"]), [np.array(s, np.int64) for s in seqs]
    )
    return leave_one_out(data, max_len=50)


def ranks(baseline: str, tie_rule: str, masked: bool = False) -> list[int]:
    split = toy_split()
    counts = baselines.bank_counts(split, N_IDS)
    fn = baselines.score_fn(baseline, tie_rule, split.test, counts, N_IDS)
    idx = np.arange(len(split.test))
    scores = fn(torch.zeros(0), torch.zeros(0), idx)
    if masked:
        mask_seen(scores, idx, split.test_seen)
    out: list[int] = target_ranks(scores, torch.from_numpy(split.test.targets)).tolist()
    return out


def test_counts_hold_training_and_validation_pairs_never_a_test_target() -> None:
    counts = baselines.bank_counts(toy_split(), N_IDS)
    assert counts.popularity.tolist() == [0, 0, 2, 3, 1, 1]  # the test targets 4, 5, 3 are not counted
    nxt, lags, n = counts.rows[2]
    assert list(zip(nxt.tolist(), lags.tolist(), n.tolist(), strict=True)) == [
        (3, 1, 3),
        (4, 2, 1),
        (5, 3, 1),
    ]


def test_popularity_ranks_by_target_counts_ties_against() -> None:
    # scores 1: 0, 2: 2, 3: 3, 4: 1, 5: 1. q0 (target 4) ties with 5 and is behind 2 and 3: rank 3; q1
    # (target 5) likewise; q2's target 3 is the most popular: rank 0
    assert ranks("popularity", "ties_against") == [3, 3, 0]
    # masked: q0 and q1 saw 1, 2, 3, leaving 4 and 5 tied; q2's target 3 was seen: a miss (every id ahead)
    assert ranks("popularity", "ties_against", masked=True) == [1, 1, 5]
    # its own tie-break orders nothing differently
    assert ranks("popularity", "popularity_tiebreak") == [3, 3, 0]


def test_last_item_markov_counts_the_last_item_at_lag_1() -> None:
    # q0, q1 end in 3: 3→4 once, every other item 0. q0's target 4 is first; q1's target 5 ties at 0
    # with 1, 2, 3 (ties against: rank 4). q2 ends in 5, which nothing followed: all tie at 0 (rank 4)
    assert ranks("last_item_markov", "ties_against") == [0, 4, 4]
    # popularity among the zeros: q1's 5 (1) beats 1 (0), not 2 (2) or 3 (3) → behind 4, 2, 3: rank 3;
    # q2's 3 is the most popular of all: rank 0
    assert ranks("last_item_markov", "popularity_tiebreak") == [0, 3, 0]
    assert ranks("last_item_markov", "ties_against", masked=True) == [0, 1, 5]
    assert ranks("last_item_markov", "popularity_tiebreak", masked=True) == [0, 1, 5]


def test_transitions_alone_is_the_channel_share_over_the_last_5_items() -> None:
    # w = 60, 30, 20, 15, 12 (1/k · lcm). q0, q1: last items 3, 2, 1 →
    #   2: 20·60·2 = 2400; 3: 30·60·3 + 20·30·2 = 6600; 4: 60·60 + 30·30 = 4500; 5: 60·30 + 30·20 = 2400
    # q2: last items 5, 4, 3, 2 →
    #   3: 15·60·3 = 2700; 4: 20·60 + 15·30 = 1650; 5: 30·60 + 20·30 + 15·20 = 2700
    split = toy_split()
    recent = baselines.tr.recent_items(split.test.inputs, split.test.lengths)
    share = baselines.primary_scores("transitions_alone", recent, baselines.bank_counts(split, N_IDS), N_IDS)
    assert share.tolist() == [
        [0, 0, 2400, 6600, 4500, 2400],
        [0, 0, 2400, 6600, 4500, 2400],
        [0, 0, 0, 2700, 1650, 2700],
    ]
    # q0's 4 is behind 3; q1's 5 ties with 2 behind 3, 4; q2's 3 ties with 5
    assert ranks("transitions_alone", "ties_against") == [1, 3, 1]
    # tie-break: 2 (2) still beats 5 (1); 3 (3) beats 5 (1)
    assert ranks("transitions_alone", "popularity_tiebreak") == [1, 3, 0]
    assert ranks("transitions_alone", "popularity_tiebreak", masked=True) == [0, 1, 5]


def test_popularity_tiebreak_orders_ties_only_and_equals_the_additive_rule() -> None:
    primary = np.array([[0.0, 5, 5, 4, 6, 4]])
    pop = np.array([0.0, 1, 9, 100, 0, 100])
    out = baselines.ordinal_scores(primary, pop)[0]
    assert out[0] == -math.inf
    # 4 (6) > 2 (5, popularity 9) > 1 (5, popularity 1) > 3 = 5 (4, popularity 100 each)
    assert out[1:].tolist() == [3.0, 4.0, 2.0, 5.0, 2.0]
    additive = primary[0] + pop / (pop.max() + 1)
    for a in range(1, 6):
        for b in range(1, 6):
            assert (out[a] > out[b]) == (additive[a] > additive[b])
            assert (out[a] == out[b]) == (additive[a] == additive[b])
    ties = baselines.ordinal_scores(primary, None)[0]
    assert ties[1:].tolist() == [3.0, 3.0, 2.0, 4.0, 2.0]  # equal scores stay equal


def test_evaluate_baseline_is_the_evaluator_over_those_ranks() -> None:
    split = toy_split()
    counts = baselines.bank_counts(split, N_IDS)
    head = np.zeros(N_IDS, bool)
    head[3] = True  # item 3 only: q2 is the head
    m = baselines.evaluate_baseline(
        "last_item_markov", "popularity_tiebreak", split.test, split.test_seen, counts, N_IDS, head
    )
    assert m["unmasked"] == pytest.approx(metrics_from_ranks(np.array([0, 3, 0])))
    assert m["masked"] == pytest.approx(metrics_from_ranks(np.array([0, 1, 5])))
    assert m["unmasked_head"]["ndcg@10"] == 1.0
    assert m["unmasked_tail"]["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
    assert ("popularity", "popularity_tiebreak") not in baselines.variants()  # the same ranking


def record() -> dict[str, Any]:
    m = {p: dict.fromkeys(METRICS, 0.25) for p in (*PROTOCOLS, *GROUPS)}
    return {
        "machine": {"cpu": "cpu", "cores": 2},
        "command": "python -m bench.baselines --datasets beauty --threads 1",
        "date": "2026-12-06T00:00:00+00:00",
        "users": 3, "items": 5, "test_queries": 3, "bank_pairs": 7, "seed": None,
        "baselines": {
            "popularity": {"ties_against": m},
            "transitions_alone": {"ties_against": m, "popularity_tiebreak": m},
        },
    }  # fmt: skip


def test_baseline_rows_join_the_retrieval_and_transition_mix_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "baselines.json").write_text(json.dumps({"datasets": {"beauty": record()}}))
    md = baselines.markdown({"datasets": {"beauty": record()}})
    assert "| transitions alone (no encoder) | popularity tie-break | 0.2500 |" in md
    entries = baselines.entries(record())
    assert set(entries) == {"popularity", "transitions_alone", "transitions_alone_popularity_tiebreak"}
    report = {"beauty": {"pretrain_only": {"encoder": "pretrain", "seeds": [0], "test": {}}, **entries}}
    report["beauty"]["pretrain_only"]["test"] = entries["popularity"]["test"]
    text = retrieval.markdown(report)
    assert "| transitions alone (no encoder), popularity tie-break | – | unmasked | 0.2500 |" in text
    assert text.index("| pretrain_only |") < text.index("| popularity | – | unmasked |")
    monkeypatch.setattr(transition_mix, "REPORTS", tmp_path)
    rows = transition_mix.baseline_rows(["beauty", "ml-100k"])
    assert list(rows) == ["beauty"]
    table = "\n".join(transition_mix.baseline_table(rows))
    assert "| beauty | transitions alone (no encoder) | masked | 0.2500 | 0.2500 |" in table


def test_the_tuned_order_is_the_one_validation_needs() -> None:
    """Every user's item at t repeats their item at t − 2 shifted by one (1 → 2 → 3 …, every other
    step); the steps between are random. The last item alone (order 1) says nothing about the next one:
    validation chooses order 2 or more, and at that order the test targets rank first."""
    rng = np.random.default_rng(0)
    n_items, seqs = 60, []  # the pattern's items 1..25, the random ones 31..60
    for _ in range(60):
        seq = [int(rng.integers(1, 21)), int(rng.integers(31, n_items + 1))]
        for t in range(2, 9):
            seq.append(seq[t - 2] + 1 if t % 2 == 0 else int(rng.integers(31, n_items + 1)))
        seqs.append(np.array(seq[:8] + [seq[6] + 1], np.int64))  # the test target follows the pattern
    users = [f"u{i}" for i in range(len(seqs))]
    data = Interactions("toy", Vocab(users, [f"i{i}" for i in range(1, n_items + 1)]), seqs)
    split = leave_one_out(data, max_len=50)
    n_ids = n_items + 1
    order = baselines.tuned_order(split, "ties_against", n_ids)
    assert order >= 2
    counts = baselines.bank_counts(split, n_ids)
    args = (split.test, split.test_seen, counts, n_ids)
    tuned = baselines.evaluate_baseline("transitions_tuned", "ties_against", *args, order=order)
    markov = baselines.evaluate_baseline("last_item_markov", "ties_against", *args)
    assert tuned["unmasked"]["hr@10"] > 0.9 > markov["unmasked"]["hr@10"]
