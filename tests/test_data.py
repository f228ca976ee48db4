"""Loading, id maps, the leave-one-out split, same-target positives and batching, on hand-made logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import dataset_dir

from model.data import (
    DataError,
    SameTargetIndex,
    Vocab,
    all_position_targets,
    bucket_batches,
    leave_one_out,
    load_dataset,
    load_inter,
    load_sequences,
    resolve_dataset,
    window_samples,
)

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_sequences_map_external_ids_densely_in_order_of_appearance(tmp_path: Path) -> None:
    data = load_sequences(write(tmp_path / "s.txt", "u1 10 20 30\nu2 20 40\n"))
    assert data.vocab.users == ["u1", "u2"]
    assert data.vocab.items == ["10", "20", "30", "40"]
    assert [s.tolist() for s in data.sequences] == [[1, 2, 3], [2, 4]]
    assert data.vocab.item_id("40") == 4 and data.vocab.external_item(4) == "40"


def test_inter_sorts_by_time_and_keeps_file_order_on_ties(tmp_path: Path) -> None:
    rows = [("a", "x", 30), ("b", "y", 5), ("a", "y", 10), ("a", "z", 10), ("a", "w", 10), ("b", "x", 1)]
    text = HEADER + "".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in rows)
    data = load_inter(write(tmp_path / "d.inter", text))
    ext = data.vocab.external_item
    # a: the three ties at t=10 keep file order (y, z, w), then x at t=30
    assert [ext(i) for i in data.sequences[0]] == ["y", "z", "w", "x"]
    assert [ext(i) for i in data.sequences[1]] == ["x", "y"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEADER + "a\tx\t3\t10\na\ty\t3\n", "d.inter:3: expected 4 tab-separated fields, got 3"),
        (HEADER + "a\tx\t3\tsoon\n", "d.inter:2: timestamp 'soon' is not a number"),
        (HEADER + "a\tx\t3\tnan\n", "d.inter:2: timestamp 'nan' is not finite"),
        ("user_id:token\titem_id:token\n", "d.inter:1: header lacks column(s) timestamp"),
        (HEADER + "\tx\t3\t1\n", "d.inter:2: empty user or item id"),
        (HEADER, "no interactions"),
    ],
)
def test_malformed_inter_names_file_line_and_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_inter(write(tmp_path / "d.inter", text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("u1 1 2\n\nu2 3 4\n", "s.txt:2: empty line"),
        ("u1 1 2\nu2\n", "s.txt:2: user 'u2' has no items"),
        ("u1 1 2\nu1 3 4\n", "s.txt:2: user 'u1' appears on more than one line"),
    ],
)
def test_malformed_sequences_name_file_line_and_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_sequences(write(tmp_path / "s.txt", text))


def test_unknown_dataset_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        resolve_dataset("nope", tmp_path)
    with pytest.raises(DataError, match="beauty/Beauty.txt does not exist"):
        resolve_dataset("beauty", tmp_path)


def test_leave_one_out_boundaries_by_hand(tmp_path: Path) -> None:
    # u1 has items 1..6, u2 has 7 8 9 (three items: one test, one valid, no training pair)
    data = load_sequences(write(tmp_path / "s.txt", "u1 a b c d e f\nu2 g h i\nu3 j\n"))
    split = leave_one_out(data, max_len=3)
    tr = split.train
    # u1 training targets are positions 1..3 (b, c, d); e is validation, f is test
    assert tr.targets.tolist() == [2, 3, 4]
    assert tr.inputs.tolist() == [[1, 0, 0], [1, 2, 0], [1, 2, 3]]
    assert tr.lengths.tolist() == [1, 2, 3]
    assert tr.prefix_lens.tolist() == [1, 2, 3]
    # validation: u1 predicts e from (b c d) — the last 3 of its 4-item prefix; u2 predicts h from g
    assert split.valid.targets.tolist() == [5, 8]
    assert split.valid.inputs.tolist() == [[2, 3, 4], [7, 0, 0]]
    assert split.valid.prefix_lens.tolist() == [4, 1]
    # test: u1 predicts f from (c d e); u2 predicts i from (g h); u3 (one item) has no sample
    assert split.test.targets.tolist() == [6, 9]
    assert split.test.inputs.tolist() == [[3, 4, 5], [7, 8, 0]]
    assert split.test.users.tolist() == [0, 1]
    # seen items cover the whole prefix, not only the 3-item window
    indptr, indices = split.test_seen
    assert indices[indptr[0] : indptr[1]].tolist() == [1, 2, 3, 4, 5]
    assert indices[indptr[1] : indptr[2]].tolist() == [7, 8]


def test_with_vocab_remaps_to_a_models_ids_and_rejects_unknown_items(tmp_path: Path) -> None:
    data = load_sequences(write(tmp_path / "s.txt", "u1 b a\n"))
    model_vocab = Vocab(users=["u9"], items=["a", "b"])
    assert [s.tolist() for s in data.with_vocab(model_vocab).sequences] == [[2, 1]]
    with pytest.raises(DataError, match="unknown to the model"):
        data.with_vocab(Vocab(users=[], items=["a"]))


def test_same_target_positive_is_another_sample_with_that_target() -> None:
    targets = np.array([5, 7, 5, 9, 5, 7])
    index = SameTargetIndex(targets)
    rng = np.random.default_rng(0)
    idx = np.arange(len(targets))
    drawn = np.stack([index.sample(idx, rng) for _ in range(200)])  # (200, N)
    assert (targets[drawn] == targets).all()
    assert (drawn[:, [0, 1, 2, 4, 5]] != idx[[0, 1, 2, 4, 5]]).all()  # never itself when others exist
    assert (drawn[:, 3] == 3).all()  # the only sample with target 9 is its own positive
    assert set(drawn[:, 0].tolist()) == {2, 4}  # both others are drawn


def test_windows_tile_every_training_target_once(tmp_path: Path) -> None:
    lines = [f"u{k} " + " ".join(f"i{j}" for j in range(n)) for k, n in enumerate([4, 9, 23, 5])]
    data = load_sequences(write(tmp_path / "s.txt", "\n".join(lines) + "\n"))
    split = leave_one_out(data, max_len=5)
    tr = split.train
    win = window_samples(tr, max_len=5)
    y_all = all_position_targets(tr.inputs[win], tr.lengths[win], tr.targets[win])
    covered = sorted((int(tr.users[w]), int(t)) for w, row in zip(win, y_all, strict=True) for t in row if t)
    expected = sorted((int(u), int(t)) for u, t in zip(tr.users, tr.targets, strict=True))
    assert covered == expected  # each (user, target) pair exactly once


def test_bucket_batches_cover_each_index_once_and_group_lengths() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 51, size=10_000)
    batches = list(bucket_batches(lengths, 100, rng, chunk_batches=10))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(10_000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 10  # random batches would spread ~49


def test_ml100k_matches_published_counts() -> None:
    # The shared data set: skipped on a machine without it, a failure under CI (conftest.dataset_dir).
    data = load_dataset("ml-100k", dataset_dir("ml-100k").parent)
    assert (data.n_users, data.vocab.n_items, data.n_interactions) == (943, 1682, 100_000)
    split = leave_one_out(data)
    assert len(split.test) == 943 and len(split.valid) == 943
    assert len(split.train) == 100_000 - 3 * 943
