"""Benchmark aggregation: per-seed result files → mean ± std and the markdown table."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import accuracy, ann, common, controls, learned_retriever, retrieval, retrieval_cost
from bench.ann import accuracy as ann_accuracy
from bench.ann import compare
from bench.common import GROUPS, METRICS, PROTOCOLS, aggregate, display_path, machine, write_result
from memory_store import IndexParams
from model import artifact
from model.data import Vocab
from model.fusion import FusionConfig, RetrievalFusion
from model.inference import InferenceConfig
from model.memory import MemoryBank
from model.predictor import Predictor
from model.sasrec import EncoderConfig, SASRec
from service.recommender import serving_predictor


def result(seed: int, ndcg10: float) -> dict[str, object]:
    metrics = {p: dict.fromkeys(METRICS, 0.1) for p in PROTOCOLS}
    metrics["unmasked"]["ndcg@10"] = ndcg10
    return {
        "dataset": "beauty",
        "variant": "sasrec",
        "objective": "sasrec",
        "scheme": "prefix",
        "seed": seed,
        "command": "memrec train --dataset beauty",
        "date": "2026-11-22T00:00:00+00:00",
        "machine": {"cpu": "cpu", "cores": 2},
        "best_epoch": 10 + seed,
        "sec_per_epoch": 20.0 + seed,
        "peak_rss_mb": 1000.0 + seed,
        "valid": metrics,
        "test": metrics,
    }


def test_aggregate_takes_mean_and_sample_std_over_seed_files(tmp_path: Path) -> None:
    for seed, v in enumerate([0.040, 0.042, 0.047]):
        (tmp_path / f"beauty.sasrec.seed{seed}.json").write_text(json.dumps(result(seed, v)))
    entry = aggregate(tmp_path)["beauty"]["sasrec"]
    ndcg = entry["test"]["unmasked"]["ndcg@10"]
    assert ndcg["seeds"] == [0.040, 0.042, 0.047]
    assert ndcg["mean"] == pytest.approx(0.043)
    assert ndcg["std"] == pytest.approx(0.0036055, abs=1e-6)  # sample std (n-1)
    assert entry["best_epoch"] == [10, 11, 12] and entry["sec_per_epoch"] == 21.0
    assert entry["peak_rss_mb"] == 1002.0 and entry["machines"] == ["cpu (2 cores)"]
    table = accuracy.markdown(aggregate(tmp_path))
    assert "| sasrec (prefix) | 3 | unmasked | 0.1000 ± 0.0000 | 0.1000 ± 0.0000" in table
    assert "0.0430 ± 0.0036" in table
    assert "| published DuoRec | – | unmasked | 0.0541 | 0.0834 | – | 0.0337 | 0.0431 | – |" in table


def test_result_trained_elsewhere_keeps_its_training_machine(tmp_path: Path) -> None:
    # s/epoch and peak RSS belong to the machine that trained; the one writing the file only evaluated.
    write_result(tmp_path / "a.json", {"machine": {"cpu": "trainer", "cores": 16}, "seed": 0})
    write_result(tmp_path / "b.json", {"seed": 0})
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["machine"] == {"cpu": "trainer", "cores": 16}
    assert b["machine"] == machine() and a["date"] and b["date"]


def test_display_paths_hide_the_machine(tmp_path: Path) -> None:
    from bench.common import ROOT

    assert display_path(ROOT / "reports" / "x.json") == "reports/x.json"
    assert display_path(tmp_path / "m") == "m"


def test_ann_metrics_on_known_rankings() -> None:
    tops = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    got = ann_accuracy(tops, np.array([7, 99]))  # rank 3 for the first target, a miss for the second
    assert got == pytest.approx({"hr@10": 0.5, "ndcg@10": 0.5 / np.log2(4)})
    ids = np.array([[1, 2, 3, -1], [4, 5, 6, 7]])
    ref_ids = np.array([[1, 2, 9, -1], [4, 5, 6, 7]])
    ref_tops = np.array([tops[0], tops[1][::-1]])  # same items, another order
    cmp = compare(tops, ids, ref_tops, ref_ids)
    assert cmp == pytest.approx(
        {"memory_recall": (2 / 3 + 1) / 2, "top10_identical": 0.5, "top10_overlap": 1.0}
    )


def test_finished_encoders_are_archived_and_found_on_another_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accuracy, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(accuracy, "ENCODERS", tmp_path / "reports" / "encoders")
    run = tmp_path / "runs" / "accuracy" / "beauty" / "pretrain-seed1"
    assert accuracy.encoder_dir("beauty", "pretrain", 1) == run  # nothing trained yet: where it will be
    (run / "checkpoints").mkdir(parents=True)
    accuracy.archive_encoder("beauty", "pretrain", 1)  # still training: nothing to archive
    assert not (tmp_path / "reports").exists()
    for name in accuracy.ENCODER_FILES:
        (run / name).write_text(name)
    accuracy.archive_encoder("beauty", "pretrain", 1)
    archived = tmp_path / "reports" / "encoders" / "beauty.pretrain.seed1"
    assert sorted(p.name for p in archived.iterdir()) == sorted(accuracy.ENCODER_FILES)  # no checkpoints
    assert accuracy.encoder_dir("beauty", "pretrain", 1) == run  # this machine still has the run
    shutil.rmtree(tmp_path / "runs")  # another machine: only the repository travels
    assert accuracy.encoder_dir("beauty", "pretrain", 1) == archived
    assert (archived / "model.safetensors").read_text() == "model.safetensors"


def test_weights_over_the_bound_stay_out_of_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accuracy, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(accuracy, "ENCODERS", tmp_path / "reports" / "encoders")
    monkeypatch.setattr(accuracy, "ARCHIVE_MAX_BYTES", 16)
    run = tmp_path / "runs" / "accuracy" / "yelp" / "sasrec_allpos-seed0"
    run.mkdir(parents=True)
    for name in accuracy.ENCODER_FILES:
        (run / name).write_text(name)
    (run / "model.safetensors").write_bytes(b"w" * 17)
    accuracy.archive_encoder("yelp", "sasrec_allpos", 0)
    assert not (tmp_path / "reports").exists()
    assert accuracy.trained_encoder("yelp", "sasrec_allpos", 0) == run  # the training machine has it
    shutil.rmtree(tmp_path / "runs")  # another machine: nothing to fine-tune on, and it says why
    assert accuracy.trained_encoder("yelp", "sasrec_allpos", 0) is None
    assert "delete its result file to retrain" in caplog.text


@pytest.fixture
def accuracy_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The accuracy benchmark's runs, results, parked checkpoints and encoders under ``tmp_path``."""
    monkeypatch.setattr(accuracy, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path / "reports" / "accuracy_runs")
    monkeypatch.setattr(accuracy, "PARKED", tmp_path / "reports" / "checkpoints")
    monkeypatch.setattr(accuracy, "ENCODERS", tmp_path / "reports" / "encoders")
    return tmp_path


def test_unfinished_runs_park_their_checkpoint_and_resume_from_it(
    accuracy_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = accuracy_dirs
    run, parked = accuracy._checkpoint_paths("beauty", "pretrain", 2)
    assert not accuracy.park("beauty", "pretrain", 2)  # nothing trained
    run.parent.mkdir(parents=True)
    run.write_bytes(b"epoch 30")
    assert accuracy.park("beauty", "pretrain", 2) and parked.read_bytes() == b"epoch 30"
    shutil.rmtree(tmp_path / "runs")  # another machine
    calls: list[list[str]] = []

    def fake_run(result_file: Path, cli_args: list[str], *_: object, **__: object) -> bool:
        calls.append(cli_args)
        assert run.read_bytes() == b"epoch 30"  # the run resumes from the parked checkpoint
        return True

    monkeypatch.setattr(accuracy, "run_recorded", fake_run)
    args = accuracy.argparse.Namespace(epochs=200, patience=10)
    assert accuracy.run_one("beauty", "pretrain", 2, args)
    assert "--resume" in calls[0] and not parked.exists()  # finished: the parked copy goes
    (tmp_path / "reports" / "accuracy_runs").mkdir(parents=True)
    (tmp_path / "reports" / "accuracy_runs" / "beauty.pretrain.seed2.json").write_text("{}")
    assert not accuracy.park("beauty", "pretrain", 2)  # a finished run is never parked


def test_warm_started_variant_starts_from_the_same_seeds_sasrec_encoder(
    accuracy_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = accuracy_dirs
    calls: list[list[str]] = []
    monkeypatch.setattr(
        accuracy, "run_recorded", lambda _f, cli_args, *a, **k: calls.append(cli_args) or True
    )
    args = accuracy.argparse.Namespace(epochs=30, patience=5)
    assert not accuracy.run_one("sports", "pretrain_warm", 1, args)  # no SASRec encoder of seed 1 yet
    assert calls == []
    base = tmp_path / "reports" / "encoders" / "sports.sasrec.seed1"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    assert accuracy.run_one("sports", "pretrain_warm", 1, args)
    cli = calls[0]
    assert cli[cli.index("--init-from") + 1] == str(base)
    assert cli[cli.index("--objective") + 1] == "pretrain" and cli[cli.index("--seed") + 1] == "1"


def test_the_chosen_memory_vote_of_each_seed_is_reported(tmp_path: Path) -> None:
    chosen = [
        {"weight": 0.3, "temperature": 0.05, "depth": 100},
        {"weight": 0.0, "temperature": 0.05, "depth": 0},
        {"weight": 0.0, "temperature": 0.05, "depth": 0},
    ]
    refused = {"weight": 0.05, "temperature": 0.1, "depth": 20}
    rules: list[dict[str, Any]] = [
        {"z": 4.93, "min_z": 2.0, "candidate": chosen[0]},  # kept
        {},  # recorded before the significance rule
        {"z": 0.42, "min_z": 2.0, "candidate": refused},  # the rule refused the validation winner
    ]
    for seed, c in enumerate(chosen):
        r = {
            **result(seed, 0.05),
            "variant": "vote",
            "encoder": "pretrain",
            "vote": {"chosen": c, "valid": [], **rules[seed]},
        }
        if seed == 0:  # a paired figure: the same model with the vote off
            off = dict.fromkeys(METRICS, 0.1) | {"ndcg@10": 0.04, "hr@10": 0.09}
            r["vote"]["test_without_vote"] = {"unmasked": off}
        (tmp_path / f"beauty.pretrain.vote.seed{seed}.json").write_text(json.dumps(r))
    report = aggregate(tmp_path, section=lambda r: f"{r['dataset']}, {r['encoder']} encoder")
    votes = report["beauty, pretrain encoder"]["vote"]["vote"]
    assert votes[1] == {"seed": 1, **chosen[1]}
    assert votes[2] == {"seed": 2, **chosen[2], "z": 0.42, "refused": refused}
    assert votes[0] == {
        "seed": 0,
        **chosen[0],
        "ndcg@10_on": 0.05,
        "ndcg@10_off": 0.04,
        "hr@10_on": 0.1,
        "hr@10_off": 0.09,
        "z": 4.93,
    }
    md = retrieval.markdown(report)
    assert "| vote | 0 | 0.3 | 0.05 | 100 | 4.9 | 0.0400 → 0.0500 | 0.0900 → 0.1000 |" in md
    assert "| vote | 1 | 0 | 0.05 | 0 | – | – | – |" in md
    assert "| vote | 2 | 0 | 0.05 | 0 | 0.4, refused λ 0.05 τ 0.1 20 voters | – | – |" in md


def test_the_chosen_transition_channel_of_each_seed_is_reported(tmp_path: Path) -> None:
    for seed, (weight, z, cand) in enumerate([(0.9, 6.1, 0.9), (0.0, 1.2, 0.5)]):
        r = {
            **result(seed, 0.06),
            "variant": "transitions",
            "encoder": "pretrain",
            "transitions": {
                "chosen": {"weight": weight, "order": 5},
                "valid": [],
                "z": z,
                "min_z": 2.0,
                "candidate": {"weight": cand, "order": 5},
            },
        }
        if weight:  # kept: the same model without the channel, on the same test queries
            off = dict.fromkeys(METRICS, 0.1) | {"ndcg@10": 0.05, "hr@10": 0.09}
            r["transitions"]["test_without_transitions"] = {"unmasked": off}
        (tmp_path / f"beauty.pretrain.transitions.seed{seed}.json").write_text(json.dumps(r))
    report = aggregate(tmp_path, section=lambda r: f"{r['dataset']}, {r['encoder']} encoder")
    rows = report["beauty, pretrain encoder"]["transitions"]["transitions"]
    assert rows[0] == {
        "seed": 0, "weight": 0.9, "z": 6.1, "ndcg@10_on": 0.06, "ndcg@10_off": 0.05, "hr@10_on": 0.1,
        "hr@10_off": 0.09,
    }  # fmt: skip
    assert rows[1]["refused"] == 0.5 and rows[1]["ndcg@10_off"] == rows[1]["ndcg@10_on"] == 0.06
    md = retrieval.markdown(report)
    assert "| transitions | 0 | 0.9 | 6.1 | 0.0500 → 0.0600 | 0.0900 → 0.1000 |" in md
    assert "| transitions | 1 | 0 | 1.2, refused λ 0.5 | 0.0600 → 0.0600 | 0.1000 → 0.1000 |" in md


def test_every_retrieval_variant_is_a_valid_finetune_command() -> None:
    parser = controls.parser()  # memrec train's own flags, which the controls take too
    base = ["train", "--dataset", "d", "--out", "o", "--stage", "finetune", "--from", "m"]
    parsed = {v: parser.parse_args([*base, *retrieval.variant_flags(v)]) for v in retrieval.VARIANTS}
    assert not parsed["raserec_k20"].vote and parsed["vote"].vote  # only the vote variants tune it
    assert not parsed["vote"].transitions and parsed["transitions"].transitions  # the channel likewise
    assert parsed["transitions"].vote and not parsed["transitions_only"].vote
    assert parsed["vote"].vote_depths == [20, 50, 100] and parsed["vote"].vote_temperatures == [
        0.02,
        0.05,
        0.1,
    ]
    wide = parsed["vote_only_wide"]
    assert wide.vote and wide.alpha == 1.0 and wide.ft_epochs == 1
    assert wide.vote_depths == [20, 50, 100, 200] and wide.vote_temperatures == [0.02, 0.05, 0.1, 0.2]
    assert wide.vote_weights == parsed["vote"].vote_weights
    assert set(retrieval.CONTROLS) <= set(retrieval.VARIANTS)
    assert "python -m bench.controls train" in retrieval.markdown({})


def test_a_control_variant_is_recorded_as_the_command_that_trains_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"test": {}}')

    monkeypatch.setattr(subprocess, "run", fake_run)  # the child process bench.common starts
    out = common.RUNS / "retrieval" / "d" / "x"
    args = ["--dataset", "d", "--out", str(out), "--no-vote"]
    metrics, recorded = common.train_cli(
        args, device="cpu", threads=1, data_dir=None, module="bench.controls"
    )
    assert metrics == {"test": {}}
    assert calls[0][1:4] == ["-m", "bench.controls", "train"]
    want = "python -m bench.controls train --dataset d --out runs/retrieval/d/x --no-vote --device cpu"
    assert recorded == want + " --threads 1"
    _, recorded = common.train_cli(args, device=None, threads=None, data_dir=None)
    assert calls[1][1:4] == ["-m", "service.cli", "train"] and recorded.startswith("memrec train --dataset d")


D = 4


def tiny_predictor(k: int, cross_user: bool = False) -> Predictor:
    torch.manual_seed(0)
    encoder = SASRec(EncoderConfig(n_items=9, dim=D, n_heads=2, n_layers=1, max_len=6, dropout=0.0))
    fusion = RetrievalFusion(FusionConfig(dim=D, n_heads=2, inner_dim=8, dropout=0.0))
    return Predictor(encoder, fusion, InferenceConfig(k=k, cross_user=cross_user))


def test_the_random_control_draws_as_memrec_train_retrieval_random_did() -> None:
    # memories 0..3 of users 0, 0, 1, 1 with prefix lengths 1, 2, 1, 2; unit keys e0..e3
    bank = MemoryBank(
        2 * np.eye(D, dtype=np.float32),
        np.array([5, 6, 7, 8]),
        np.array([0, 0, 1, 1]),
        np.array([1, 2, 1, 2]),
    )
    predictor = tiny_predictor(k=2)
    states = np.array([[0, 0, 3, 4], [0, 1, 0, 0], [3, 4, 0, 0]], np.float32)
    windows = [np.array([1, 2])] * 3
    plan = predictor.plan(states, windows, np.array([1, 0, 1]), prefix_lens=np.array([2, 1, 1]))
    # np.random.default_rng(0).integers(0, 4, size=(3, 4)): 2 · k draws per query
    assert np.random.default_rng(0).integers(0, 4, size=(3, 4)).tolist() == [
        [3, 2, 2, 1],
        [1, 0, 0, 0],
        [0, 3, 2, 3],
    ]
    # query 0 (user 1, position 2) may not see memory 3 → 2, 2; query 1 (user 0, position 1) sees
    # none of 1, 0, 0, 0; query 2 (user 1, position 1) sees memory 0 only
    hits = controls.RandomMemories(seed=0)(predictor, bank, plan, 2)
    assert hits.ids.tolist() == [[2, 2], [-1, -1], [0, -1]]
    inf = np.inf  # the true cosines of the drawn memories, -inf at empty slots
    np.testing.assert_allclose(hits.scores, [[0.6, 0.6], [-inf, -inf], [0.6, -inf]], rtol=1e-6)
    assert hits.items.tolist() == [[7, 7], [0, 0], [5, 0]]
    again = controls.RandomMemories(seed=0)(predictor, bank, plan, 2)  # a fresh generator every call
    assert np.array_equal(again.ids, hits.ids)
    mem = predictor.memories(plan, hits)  # the predictor fuses them as drawn
    assert mem.present.tolist() == [[True, True], [False, False], [True, False]]
    assert mem.items.tolist() == [[7, 7], [0, 0], [5, 0]]


def tiny_artifact(train_config: dict[str, Any]) -> artifact.Artifact:
    predictor = tiny_predictor(k=2)
    rng = np.random.default_rng(0)
    bank = MemoryBank(
        rng.normal(size=(12, D)).astype(np.float32),
        rng.integers(1, 10, 12),
        rng.integers(0, 3, 12),
        rng.integers(1, 5, 12),
    )
    vocab = Vocab([f"u{i}" for i in range(3)], [f"i{i}" for i in range(1, 10)])
    return artifact.Artifact(
        predictor.encoder,
        vocab,
        "toy",
        model_version="toy-1",
        train_config=train_config,
        fusion=predictor.fusion,
        bank=bank,
        inference=predictor.cfg.to_json(),
    )


def test_the_service_refuses_to_serve_a_control_model() -> None:
    assert serving_predictor(tiny_artifact({}), frozen=False).retrieval  # a product model is served
    with pytest.raises(artifact.ArtifactError, match="benchmark control.*random"):
        serving_predictor(tiny_artifact({"retrieval": "random"}), frozen=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sequence file with a learnable pattern."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(60):
        start = int(rng.integers(0, 15))
        lines.append(
            f"user-{u} " + " ".join(f"sku-{(start + k) % 15}" for k in range(int(rng.integers(5, 10))))
        )
    path = tmp_path_factory.mktemp("data") / "toy.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_random_control_trains_as_memrec_train_and_is_marked_a_control(
    toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "control"
    args = [
        "train",
        "--dataset",
        str(toy),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--ft-epochs",
        "1",
        "--k",
        "4",
    ]
    assert controls.main([*args, "--device", "cpu", "--threads", "1", "--no-vote", "--no-transitions"]) == 0
    printed = json.loads(capsys.readouterr().out)
    art = artifact.load(out)
    assert printed["model_version"] == art.model_version and "test" in printed and "cost" not in printed
    assert art.train_config["retrieval"] == "random"
    assert controls.retrieval_of(art) == controls.RandomMemories(seed=0)
    with pytest.raises(artifact.ArtifactError, match="benchmark control"):
        serving_predictor(art)
    assert art.bank is not None
    cost = retrieval_cost.measure_dir(out, str(toy), n_queries=20)
    assert cost["bank_memories"] == len(art.bank) and cost["bank_mb"] > 0
    assert all(cost[f"{step}_ms_per_1k"] > 0 for step in ("encode", "retrieve", "fuse"))


def test_ann_answers_through_the_predictor_with_the_nearest_memories() -> None:
    art = tiny_artifact({})
    predictor = serving_predictor(art, frozen=False)
    assert art.bank is not None
    index = ann.build_index(art, IndexParams(threads=1))
    histories = [[1, 2, 3], [4], [5, 6]]
    plan = predictor.prepare(histories, ["u0", "u1", "u2"])
    masks = [np.array(h) for h in histories]
    tops, ids, search_s = ann.answer(predictor, index, plan, masks)
    assert tops.shape == (3, 10) and ids.shape == (3, 2) and search_s >= 0
    for row, h in enumerate(histories):
        assert not set(tops[row].tolist()) & set(h)  # seen items masked
    cos = (plan.states / np.linalg.norm(plan.states, axis=1, keepdims=True)) @ art.bank.unit_keys.T
    nearest = np.argsort(-cos, axis=1, kind="stable")[:, :2] + 1  # the index's memory ids are 1..N
    assert ids.tolist() == nearest.tolist()


def test_learned_retriever_report_pairs_each_rule_with_none_seed_by_seed() -> None:
    def record(seed: int, none: float, learned: float) -> dict[str, Any]:
        scores = {"none": none, "similarity": none, "random": none - 0.01, "learned": learned}
        test = {rule: {p: {"ndcg@10": v} for p in ("unmasked", "masked")} for rule, v in scores.items()}
        return {"seed": seed, "test": test}

    # the encoders differ a lot between seeds; the effect of a rule does not
    diffs = learned_retriever.paired([record(0, 0.10, 0.12), record(1, 0.30, 0.32), record(2, 0.50, 0.53)])
    assert set(diffs) == {"similarity", "random", "learned"}
    assert diffs["learned"]["unmasked"]["seeds"] == pytest.approx([0.02, 0.02, 0.03])
    assert diffs["learned"]["masked"]["mean"] == pytest.approx(0.07 / 3)
    assert diffs["learned"]["unmasked"]["std"] == pytest.approx(np.std([0.02, 0.02, 0.03], ddof=1))
    assert diffs["similarity"]["unmasked"]["mean"] == 0.0
    assert diffs["random"]["masked"]["mean"] == pytest.approx(-0.01)


def test_learned_retriever_joins_the_ablation_of_the_encoder_it_ran_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retrieval, "RESULTS", tmp_path / "retrieval_runs")
    monkeypatch.setattr(retrieval, "REPORTS", tmp_path)
    monkeypatch.setattr(learned_retriever, "RESULTS", tmp_path / "learned_retriever_runs")
    (tmp_path / "retrieval_runs").mkdir()
    (tmp_path / "learned_retriever_runs").mkdir()
    for seed in (0, 1):
        r = {**result(seed, 0.04), "variant": "pretrain_only", "encoder": "pretrain"}
        name = f"beauty.pretrain.pretrain_only.seed{seed}.json"
        (tmp_path / "retrieval_runs" / name).write_text(json.dumps(r))
    other = {**result(0, 0.03), "variant": "pretrain_only", "encoder": "sasrec"}  # not the ablation's
    (tmp_path / "retrieval_runs" / "beauty.sasrec.pretrain_only.seed0.json").write_text(json.dumps(other))

    def lr_record(dataset: str, variant: str, seed: int, learned: float | None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "dataset": dataset, "encoder_variant": variant, "seed": seed, "command": f"lr {seed}",
            "date": "2026-12-06T00:00:00+00:00", "machine": {"cpu": "cpu", "cores": 2},
        }  # fmt: skip
        if learned is not None:
            whole = {p: dict.fromkeys(METRICS, 0.1) | {"ndcg@10": learned} for p in (*PROTOCOLS, *GROUPS)}
            record["test_all"] = dict.fromkeys(learned_retriever.RULES, whole)
        return record

    runs = tmp_path / "learned_retriever_runs"
    for seed, v in enumerate([0.041, 0.043]):
        (runs / f"beauty.seed{seed}.json").write_text(json.dumps(lr_record("beauty", "pretrain", seed, v)))
    # no ablation on this encoder, and a run recorded before the whole-test figures: neither appears
    (runs / "ml-100k.seed0.json").write_text(json.dumps(lr_record("ml-100k", "sasrec_allpos", 0, 0.05)))
    (runs / "sports.seed0.json").write_text(json.dumps(lr_record("sports", "pretrain_warm", 0, None)))

    report = retrieval.write_report()
    # the ablation's own encoder is keyed by the dataset alone, as in reports/accuracy.json
    assert set(report) == {"beauty", "beauty, sasrec encoder"}
    assert report["beauty"]["pretrain_only"]["test"]["unmasked"]["ndcg@10"]["mean"] == pytest.approx(0.04)
    assert "learned_retriever" not in report["beauty, sasrec encoder"]
    entry = report["beauty"]["learned_retriever"]
    assert entry["seeds"] == [0, 1] and entry["commands"] == ["lr 0", "lr 1"]
    assert entry["test"]["unmasked"]["ndcg@10"]["seeds"] == [0.041, 0.043]
    assert entry["test"]["masked_tail"]["ndcg@10"]["mean"] == pytest.approx(0.042)
    md = (tmp_path / "retrieval.md").read_text()
    assert "## beauty, pretrain encoder" in md and "## beauty, sasrec encoder" in md
    assert "| learned_retriever | 2 | unmasked | 0.1000 ± 0.0000 | 0.1000 ± 0.0000 | 0.1000 ± 0.0000" in md
    assert "| learned_retriever | 0.0420 ± 0.0014 |" in md  # the long-tail table
    assert "| learned_retriever | [" not in md  # nothing trained: no training-cost row
    assert md.index("| pretrain_only | 2 |") < md.index("| learned_retriever | 2 |")
