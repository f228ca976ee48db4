"""User memories offline: the replay through the store's eviction code, its snapshots (never the target
or the future), the two quality functions on a hand-computed case, and the fusion's user slots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import artifact
from model.artifact import ArtifactError
from model.data import Interactions, Split, Vocab, leave_one_out
from model.finetune import FinetuneConfig, finetune
from model.fusion import FusionConfig, RetrievalFusion
from model.inference import InferenceConfig
from model.predictor import Memories, Predictor
from model.sasrec import EncoderConfig, SASRec
from model.user_memory import UserMemoryConfig, replay, split_samples
from service.cli import main
from service.memory_rules import store_rules
from service.recommender import serving_predictor

D = 8


def one_hot_items(n_items: int) -> np.ndarray:
    emb = np.zeros((n_items + 1, D), np.float32)  # row 0 = padding
    emb[1:, :] = np.eye(D, dtype=np.float32)[1 : n_items + 1]
    return emb


def split_of(*seqs: list[int]) -> Split:
    n_items = max(max(s) for s in seqs)
    vocab = Vocab([f"u{u}" for u in range(len(seqs))], [str(i) for i in range(1, n_items + 1)])
    return leave_one_out(Interactions("toy", vocab, [np.array(s) for s in seqs]), max_len=6)


Snapshots = dict[tuple[int, int], set[int]]


def snapshots(split: Split, states_for: dict[int, int], cfg: UserMemoryConfig) -> Snapshots:
    """Replay with the state of prefix p pointing at item ``states_for[p]``; (user, p) → items held."""
    samples = split_samples(split)
    emb = one_hot_items(7)
    states = np.stack([emb[states_for.get(int(p), 1)] for p in samples.prefix_lens])
    table = replay(emb, samples, states, cfg, store_rules())
    got = table.lookup(samples)
    return {
        (int(u), int(p)): set(row[row > 0].tolist())
        for u, p, row in zip(samples.users, samples.prefix_lens, got, strict=True)
    }


def test_a_sample_sees_only_items_before_its_target() -> None:
    split = split_of([1, 2, 3, 4, 5], [6, 7, 6, 5])
    snap = snapshots(split, {}, UserMemoryConfig(capacity=10))
    assert snap[(0, 1)] == {1} and snap[(0, 3)] == {1, 2, 3} and snap[(0, 4)] == {1, 2, 3, 4}
    assert snap[(1, 2)] == {6, 7} and snap[(1, 3)] == {6, 7}  # the repeated 6 merged, not duplicated
    assert len(snap) == len(split.train) + len(split.valid) + len(split.test)


def test_recency_frequency_forgets_stale_entries_that_fewest_accesses_keeps() -> None:
    # Items 1…7 in order, capacity 2, one access per query. Queries 1–3 point at item 1, later ones at
    # the newest item. Worked by hand (half-life 1 interaction): at p = 4 the store holds {1, 4};
    # fewest-accesses evicts 4 (1 access against item 1's 3), recency-frequency evicts the stale item 1
    # (quality 3.08·2⁻¹ = 1.54 against 2.39).
    split = split_of([1, 2, 3, 4, 5, 6, 7])
    states = {1: 1, 2: 1, 3: 1, 4: 4, 5: 5, 6: 6}
    fewest = snapshots(split, states, UserMemoryConfig(capacity=2, quality="fewest_accesses", access_top=1))
    recent = snapshots(split, states, UserMemoryConfig(capacity=2, access_top=1, half_life=1.0))
    assert [fewest[(0, p)] for p in range(1, 7)] == [{1}, {1, 2}, {1, 3}, {1, 4}, {1, 5}, {1, 6}]
    assert [recent[(0, p)] for p in range(1, 7)] == [{1}, {1, 2}, {1, 3}, {1, 4}, {4, 5}, {5, 6}]


def test_replay_counts_and_refuses_unknown_samples() -> None:
    split = split_of([1, 2, 3, 4, 5, 6, 7])
    samples = split_samples(split)
    emb = one_hot_items(7)
    table = replay(
        emb, samples, emb[samples.targets], UserMemoryConfig(capacity=2, access_top=1), store_rules()
    )
    assert table.stats.evictions == 5 and table.stats.merges == 0 and table.stats.accesses == 6
    assert table.capacity == 2
    with pytest.raises(KeyError, match="outside the split"):
        table.lookup(split_of([1, 2, 3, 4, 5, 6, 7, 1, 2]).test)
    with pytest.raises(ValueError, match="quality"):
        UserMemoryConfig(quality="lru")


def test_user_slots_reach_the_fusion_with_their_type_vector() -> None:
    torch.manual_seed(0)
    fusion = RetrievalFusion(FusionConfig(dim=D, user_memories=True, dropout=0.0)).eval()
    assert fusion.user_type is not None and "user_type" in fusion.state_dict()
    h = torch.randn(2, D)
    keys, values = torch.randn(2, 3, D), torch.randn(2, 3, D)
    mask = torch.tensor([[False, True, True], [False, False, False]])  # row 1: no memory at all
    slots = torch.tensor([[False, False, True], [False, False, True]])
    sims = torch.zeros(2, 3)
    with torch.no_grad():
        fusion.user_type.fill_(1.0)
        out = fusion(h, keys, values, mask, sims, slots)
        plain = fusion(h, keys, values, mask, sims)
    torch.testing.assert_close(out[1], h[1])  # nothing to attend: h itself
    assert not torch.allclose(out[0], h[0])
    # the type vector moves the attention between the retrieved memory and the user's own
    assert not torch.allclose(out[0], plain[0])
    alone = torch.tensor([[False, False, True]])
    with torch.no_grad():
        only_user = fusion(h[:1], keys[:1], values[:1], alone, sims[:1], slots[:1])
    assert not torch.allclose(only_user[0], h[0])  # a user memory alone refines h


def test_the_predictor_appends_user_memories_after_the_retrieved_ones() -> None:
    torch.manual_seed(0)
    encoder = SASRec(EncoderConfig(n_items=7, max_len=6, dim=D, n_heads=2, inner_dim=16)).eval()
    fusion = RetrievalFusion(FusionConfig(dim=D, user_memories=True))
    predictor = Predictor(encoder, fusion, InferenceConfig(k=2, user_memories=True))
    h = torch.randn(2, D)
    keys = np.zeros((2, 2, D), np.float32)
    mem = Memories(
        cols=np.array([[0, 1], [0, 1]]),
        present=np.array([[True, True], [True, False]]),
        items=np.array([[1, 2], [3, 0]]),
        sims=np.array([[0.9, 0.5], [0.4, 0.0]], np.float32),
        keys=keys,
    )
    user_items = np.array([[4, 5, 0], [6, 0, 0]])
    with torch.no_grad():
        keys_t, values, mask, sims, slots = predictor.memory_inputs(h, mem, user_items)
        emb = encoder.item_emb.weight
    assert keys_t.shape == values.shape == (2, 5, D) and mask.shape == sims.shape == (2, 5)
    assert slots is not None and slots.tolist() == [[False, False, True, True, True]] * 2
    assert mask.tolist() == [[True, True, True, True, False], [True, False, True, False, False]]
    torch.testing.assert_close(values[0, 2:4], emb[[4, 5]])
    unit = emb[4] / emb[4].norm()
    torch.testing.assert_close(keys_t[0, 2], unit)
    torch.testing.assert_close(sims[0, 2], h[0] @ unit / h[0].norm())
    assert float(sims[0, 4]) == 0.0  # empty slot
    with pytest.raises(ValueError, match="rules"):  # the replay needs the store's rules
        finetune(encoder, split_of([1, 2, 3, 4, 5]), FusionConfig(dim=D), FinetuneConfig(epochs=1),
                 InferenceConfig(k=2, user_memories=True))  # fmt: skip


def test_cli_user_memory_model_reloads_and_reproduces_its_test_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "toy.txt"
    rows = [" ".join(f"s{(u + k) % 9}" for k in range(int(rng.integers(5, 14)))) for u in range(60)]
    data.write_text("".join(f"u{u} {r}\n" for u, r in enumerate(rows)))
    out = tmp_path / "m"
    args = ["train", "--dataset", str(data), "--out", str(out), "--epochs", "2", "--device", "cpu"]
    flags = ["--k", "4", "--ft-epochs", "2", "--user-memories", "--user-memory-slots", "4"]
    assert main([*args, "--stage", "all", *flags, "--memory-quality", "fewest_accesses"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert json.loads((out / "inference.json").read_text())["user_memories"]
    assert saved["finetune"]["memory_quality"] == "fewest_accesses"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--dataset", str(data), "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["unmasked"] == saved["metrics"]["test"]["unmasked"]
    assert got["masked"] == saved["metrics"]["test"]["masked"]
    # The service serves it with its users' memories (tests/test_service_user_memories.py), which it
    # replays from their first items: a model directory without them is refused.
    art = artifact.load(out)
    assert serving_predictor(art).cfg.user_memories
    art.first_items = None
    with pytest.raises(ArtifactError, match="first items"):
        serving_predictor(art)


def test_bench_memory_measures_on_a_hand_made_case() -> None:
    from bench.user_memory import memory_metrics, prior_items, repeat_recall, seen_before

    split = split_of([1, 2, 1, 3, 2, 4])
    samples = split_samples(split)
    order = np.argsort(samples.prefix_lens)
    repeats, distinct = prior_items(samples)
    assert repeats[order].tolist() == [False, True, False, True, False]
    assert distinct[order].tolist() == [1, 2, 2, 3, 3]
    emb = one_hot_items(7)
    table = replay(
        emb, samples, emb[samples.targets], UserMemoryConfig(capacity=2, access_top=1), store_rules()
    )
    snap = table.lookup(samples)[order]
    # repeats: item 1 at p=2 (held: {1, 2}); item 2 at p=4 (held: two of {1, 2, 3}); recall counts them
    assert snap.tolist() == [[1, 0], [1, 2], [1, 2], [1, 3], [1, 2]]  # targets 2, 1, 3, 2, 4
    assert repeat_recall(table, samples, repeats) == 0.5  # 1 held at p=2, 2 evicted by p=4
    seqs = [np.array([1, 2, 1, 3, 2, 4])]
    got = memory_metrics(torch.from_numpy(emb), table, samples, seen_before(seqs, samples))
    # one-hot embeddings: a target is covered (cosine 1) when held, else 0 (empty slots never count)
    assert got["coverage"] == pytest.approx(1 / 5)  # only p=2's target is held
    assert seen_before(seqs, samples.subset(order[2:3]))[1].tolist() == [1, 2, 1]


def test_bench_lists_fused_models_from_their_directories(tmp_path: Path) -> None:
    from bench.user_memory import fused_md, fused_rows

    def metrics(ndcg: float) -> dict[str, dict[str, float]]:
        return {p: {"ndcg@10": ndcg, "hr@10": 2 * ndcg} for p in ("unmasked", "masked")}

    for name, ft in (("plain", {"k": 20}), ("um", {"user_memories": True, "memory_quality": "fewest_accesses",
                                                   "user_capacity": 75})):  # fmt: skip
        (tmp_path / name).mkdir()
        config = {"finetune": ft, "metrics": {"test": metrics(0.05), "encoder": {"test": metrics(0.06)},
                                              "best_epoch": 3, "sec_per_epoch": 12.5}}  # fmt: skip
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    rows = fused_rows([str(tmp_path / "plain"), str(tmp_path / "um")])
    assert [r["user_memories"] for r in rows] == [False, True] and rows[1]["quality"] == "fewest_accesses"
    table = fused_md(rows)
    assert table[-2].endswith("| – | 0.0500 | 0.1000 | 0.0500 | 0.0600 | 12.5 |")
    assert "| C=75, fewest_accesses |" in table[-1]
