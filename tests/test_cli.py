"""`memrec train` and `memrec evaluate` end to end: the model directory reloads and reproduces its
test metrics exactly; a damaged directory fails with a message naming the file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dataset_dir

from model import artifact
from service.cli import main

DATA_DIR = Path(os.environ.get("MEMREC_DATA_DIR", "../shared/data"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sequence file with a learnable pattern and external string ids."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "toy.txt"
    lines = []
    for u in range(120):
        start = int(rng.integers(0, 15))
        items = [f"sku-{(start + k) % 15}" for k in range(int(rng.integers(5, 12)))]
        lines.append(f"user-{u} " + " ".join(items))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    args = ["train", "--dataset", str(dataset), "--out", str(out), "--epochs", "3", "--device", "cpu"]
    code = main([*args, "--stage", "pretrain"])
    assert code == 0
    return out


def test_train_writes_a_self_contained_model_directory(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir() if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["encoder"]["n_items"] == 15
    assert config["model_version"].startswith("toy-")
    assert config["metrics"]["epochs_run"] == 3
    art = artifact.load(model_dir)
    assert art.vocab.items[0].startswith("sku-") and len(art.vocab.users) == 120


def test_evaluate_reproduces_the_training_run_exactly(
    model_dir: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model_dir), "--dataset", str(dataset), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = json.loads((model_dir / "config.json").read_text())["metrics"]["test"]
    assert out["unmasked"] == saved["unmasked"] and out["masked"] == saved["masked"]


def test_the_seed_determines_the_training_run(dataset: Path, tmp_path: Path) -> None:
    # The weights are initialised from the seed too, not from whatever state the process's RNG is in:
    # the same command gives the same model, another seed another one.
    def weights(seed: int, out: Path) -> dict[str, torch.Tensor]:
        args = ["train", "--dataset", str(dataset), "--out", str(out), "--epochs", "1", "--device", "cpu"]
        assert main([*args, "--stage", "pretrain", "--seed", str(seed)]) == 0
        return artifact.load(out).encoder.state_dict()

    torch.manual_seed(123)  # a process RNG state unlike the next call's
    first = weights(0, tmp_path / "a")
    again = weights(0, tmp_path / "b")
    other = weights(1, tmp_path / "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["item_emb.weight"], other["item_emb.weight"])


def test_init_from_starts_pretraining_at_a_trained_encoder(
    model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    # lr 0: no step moves the weights, so what comes out is exactly what training started from; the
    # seed's own random initialisation would differ from the base encoder.
    args = ["train", "--dataset", str(dataset), "--out", str(tmp_path), "--epochs", "1", "--device", "cpu"]
    args += ["--stage", "pretrain", "--objective", "pretrain", "--seed", "7", "--lr", "0"]
    assert main([*args, "--init-from", str(model_dir)]) == 0
    warm, base = artifact.load(tmp_path).encoder.state_dict(), artifact.load(model_dir).encoder.state_dict()
    assert all(torch.equal(warm[k], base[k]) for k in base)


def test_init_from_refuses_a_disjoint_vocabulary_or_another_shape(
    model_dir: Path, dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = tmp_path / "other.txt"  # the same shape of data over other item ids
    other.write_text(
        "".join(f"u{u} " + " ".join(f"x{(u + k) % 7}" for k in range(6)) + "\n" for u in range(30))
    )
    args = ["train", "--out", str(tmp_path / "m"), "--epochs", "1", "--device", "cpu", "--stage", "pretrain"]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--dataset", str(other), "--init-from", str(model_dir)]) == 2
    assert "knows none of these items" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--dataset", str(dataset), "--max-len", "20", "--init-from", str(model_dir)]) == 2
    assert "differs in max_len" in caplog.text
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_init_from_a_grown_catalogue_keeps_the_known_rows_and_derives_the_new_ones(
    model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    # the toy data plus users who go on from sku-3 to the new items n1 (always right after it) and n2
    grown = tmp_path / "grown.txt"
    extra = "".join(f"v{u} sku-{u % 3} sku-3 n1 n2 sku-{u % 3 + 4}\n" for u in range(12))
    grown.write_text(dataset.read_text() + extra)
    args = [
        "train",
        "--dataset",
        str(grown),
        "--out",
        str(tmp_path / "m"),
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    args += ["--stage", "pretrain", "--seed", "7", "--lr", "0"]  # lr 0: the weights training starts from
    assert main([*args, "--init-from", str(model_dir)]) == 0
    base, warm = artifact.load(model_dir), artifact.load(tmp_path / "m")
    old, new = base.encoder.item_emb.weight, warm.encoder.item_emb.weight
    assert warm.vocab.n_items == base.vocab.n_items + 2
    for item in base.vocab.items:  # every known item's row, bit for bit, wherever it now sits
        assert torch.equal(new[warm.vocab.item_id(item)], old[base.vocab.item_id(item)])
    # n1 only ever follows sku-3 (lag 1) and the users' first items (lag 2): their lag-weighted mean
    # (a test pair never counts: the training pairs of the v-users end before their last two items)
    n1 = new[warm.vocab.item_id("n1")]
    firsts = torch.stack([old[base.vocab.item_id(f"sku-{u % 3}")] for u in range(12)]).double()
    want = (60 * 12 * old[base.vocab.item_id("sku-3")].double() + 30 * firsts.sum(0)) / (60 * 12 + 30 * 12)
    torch.testing.assert_close(n1.double(), want, rtol=1e-5, atol=1e-6)
    state, base_state = warm.encoder.state_dict(), base.encoder.state_dict()
    assert all(torch.equal(state[k], base_state[k]) for k in base_state if k != "item_emb.weight")


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
            "model.safetensors",
        ),
        (lambda d: (d / "vocab.json").unlink(), "vocab.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    ],
)
def test_damaged_model_directory_names_the_file(
    model_dir: Path,
    dataset: Path,
    tmp_path: Path,
    damage: object,
    file: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for p in model_dir.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    damage(copy)  # type: ignore[operator]
    with caplog.at_level(logging.ERROR):
        assert main(["evaluate", "--model", str(copy), "--dataset", str(dataset), "--device", "cpu"]) == 2
    assert str(copy / file) in caplog.text


def test_bad_dataset_is_an_error_not_a_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("u1 a b\n\n")
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--dataset", str(bad), "--out", str(tmp_path / "m"), "--epochs", "1"]) == 2
    assert not (tmp_path / "m").exists()  # nothing written
    assert "bad.txt:2: empty line" in caplog.text


@pytest.fixture(scope="module")
def rag_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rag")
    args = ["train", "--dataset", str(dataset), "--out", str(out), "--epochs", "3", "--device", "cpu"]
    assert main([*args, "--stage", "all", "--k", "5", "--ft-epochs", "2", "--residual-norm"]) == 0
    return out


def test_full_pipeline_writes_fusion_and_memory_bank(rag_dir: Path, dataset: Path) -> None:
    names = sorted(p.name for p in rag_dir.iterdir() if p.is_file())
    assert names == [
        "config.json",
        "fusion.safetensors",
        "inference.json",
        "memory.safetensors",
        "model.safetensors",
        "vocab.json",
    ]
    art = artifact.load(rag_dir)
    assert art.fusion is not None and art.bank is not None and art.fusion.cfg.residual_norm
    # the bank holds every training and validation pair and no test target
    lengths = [len(line.split()) - 1 for line in dataset.read_text().splitlines()]
    assert len(art.bank) == sum(n - 3 for n in lengths) + len(lengths)
    test_positions = {(u, n - 1) for u, n in enumerate(lengths)}
    # Each user's first item, the one history item no memory holds, travels with the bank.
    firsts = [line.split()[1] for line in dataset.read_text().splitlines()]
    assert art.first_items is not None
    assert [art.vocab.external_item(int(i)) for i in art.first_items] == firsts
    memories = set(zip(art.bank.users.tolist(), art.bank.prefix_lens.tolist(), strict=True))
    assert not memories & test_positions
    config = json.loads((rag_dir / "config.json").read_text())
    assert art.inference["k"] == 5 and config["metrics"]["memories"] == len(art.bank)
    assert "encoder" in config["metrics"] and "test" in config["metrics"]["encoder"]
    assert "k" not in config["finetune"]  # how it scores is the inference config's alone


def test_retrieval_model_reloads_and_reproduces_its_test_metrics(
    rag_dir: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(rag_dir), "--dataset", str(dataset), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = json.loads((rag_dir / "config.json").read_text())["metrics"]
    assert out["unmasked"] == saved["test"]["unmasked"] and out["masked"] == saved["test"]["masked"]
    assert out["encoder"] == saved["encoder"]["test"]


def test_finetune_stage_reuses_an_encoder(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    args = ["train", "--dataset", str(dataset), "--out", str(tmp_path), "--device", "cpu"]
    assert main([*args, "--stage", "finetune", "--from", str(model_dir), "--ft-epochs", "1", "--gate"]) == 0
    art, base = artifact.load(tmp_path), artifact.load(model_dir)
    assert art.fusion is not None and art.fusion.cfg.gate
    assert all(torch.equal(v, base.encoder.state_dict()[k]) for k, v in art.encoder.state_dict().items())
    assert art.model_version != base.model_version


def test_damaged_memory_bank_names_the_file(rag_dir: Path, tmp_path: Path) -> None:
    for p in rag_dir.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "memory.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(artifact.ArtifactError, match="memory.safetensors"):
        artifact.load(tmp_path)


def test_ml100k_one_epoch_learns_something(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = dataset_dir("ml-100k").parent  # skips without the data; fails so under CI
    args = [
        "train",
        "--dataset",
        "ml-100k",
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path),
        "--epochs",
        "2",
    ]
    assert (
        main([*args, "--stage", "pretrain", "--scheme", "allpos", "--objective", "sasrec", "--device", "cpu"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    # 1,682 items: random ranking gives HR@10 ≈ 0.006; two epochs already beat it several times over
    assert out["test"]["unmasked"]["hr@10"] > 0.02


def test_vote_is_tuned_on_validation_and_reproduced_on_reload(
    model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # On the toy cycles a memory of the same prefix names the right next item, so validation turns
    # the vote on; the chosen vote is saved, and `memrec evaluate` reproduces the test metrics with it.
    args = ["train", "--dataset", str(dataset), "--out", str(tmp_path), "--device", "cpu"]
    assert main([*args, "--stage", "finetune", "--from", str(model_dir), "--ft-epochs", "1", "--vote"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    inference = json.loads((tmp_path / "inference.json").read_text())
    vote, table = config["metrics"]["vote"]["chosen"], config["metrics"]["vote"]["valid"]
    assert inference["vote"] == vote and vote["weight"] > 0  # what validation chose is what serves
    assert table[0]["weight"] == 0.0 and len(table) == 46  # off + 5 λ × 3 τ × 3 depths
    assert config["metrics"]["vote"]["grid"]["depths"] == [20, 50, 100]  # the result names its grid
    z = config["metrics"]["vote"]["z"]  # its gain over off in standard errors (None: without spread)
    assert config["metrics"]["vote"]["min_z"] == 2.0 and (z is None or z >= 2.0)
    assert config["metrics"]["vote"]["candidate"] == vote  # the kept winner is the one z belongs to
    allowed = [row for row in table if row["hr@10"] >= table[0]["hr@10"]]  # the HR@10 guard
    best = max(allowed, key=lambda row: row["ndcg@10"])
    assert (best["weight"], best["temperature"], best["depth"]) == tuple(vote.values())
    assert best["ndcg@10"] > table[0]["ndcg@10"]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path), "--dataset", str(dataset), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unmasked"] == config["metrics"]["test"]["unmasked"]
    assert out["unmasked"]["ndcg@10"] > out["encoder"]["unmasked"]["ndcg@10"]
    # The paired figure: the same model with the vote switched off, as `memrec evaluate` gives it.
    inference["vote"]["weight"] = 0.0
    (tmp_path / "inference.json").write_text(json.dumps(inference))
    assert main(["evaluate", "--model", str(tmp_path), "--dataset", str(dataset), "--device", "cpu"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["unmasked"] == config["metrics"]["vote"]["test_without_vote"]["unmasked"]
    assert off["unmasked"]["ndcg@10"] < out["unmasked"]["ndcg@10"]


def test_vote_grid_flags_set_the_candidates(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    args = ["train", "--dataset", str(dataset), "--out", str(tmp_path), "--device", "cpu", "--stage"]
    args += ["finetune", "--from", str(model_dir), "--ft-epochs", "1", "--vote", "--vote-weights", "0.3"]
    assert main([*args, "--vote-temperatures", "0.2", "--vote-depths", "7", "200"]) == 0
    vote = json.loads((tmp_path / "config.json").read_text())["metrics"]["vote"]
    assert vote["grid"] == {"weights": [0.3], "temperatures": [0.2], "depths": [7, 200]}
    assert [(r["weight"], r["temperature"], r["depth"]) for r in vote["valid"]] == [
        (0.0, 0.05, 0),
        (0.3, 0.2, 7),
        (0.3, 0.2, 200),
    ]
    # The choice is the one validation makes by model.vote.tune's rule, applied to the recorded table:
    # the best NDCG@10 among the rows whose HR@10 is not below off's (ties to the earlier row); a vote
    # that wins is kept only if its paired gain is at least min_z standard errors (z None: a gain
    # without spread, an infinite z).
    table, names = vote["valid"], ("weight", "temperature", "depth")
    allowed = [j for j, row in enumerate(table) if row["hr@10"] >= table[0]["hr@10"]]
    best = max(allowed, key=lambda j: (table[j]["ndcg@10"], -j))
    winner = {name: table[best][name] for name in names}
    assert vote["candidate"] == (winner if best else None)
    kept = best > 0 and (vote["z"] is None or vote["z"] >= vote["min_z"])
    off = {name: table[0][name] for name in names}
    assert vote["chosen"] == (winner if kept else off)
    # On the toy cycles a voter of the same prefix names the next item (see the test above): both
    # votes rank every validation target first, NDCG@10 1.0 against off's ~0.5, and the tie goes to
    # the earlier candidate, the 7 voters.
    assert [row["ndcg@10"] for row in table[1:]] == [1.0, 1.0] and table[0]["ndcg@10"] < 0.6
    assert vote["chosen"] == {"weight": 0.3, "temperature": 0.2, "depth": 7}


def test_transitions_are_tuned_on_validation_and_reproduced_on_reload(
    model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The toy cycles make the next item a function of the last one: the transitions predict it, and
    # validation keeps the channel at order 1 (the earlier items only blur it). Its order and λ are
    # saved and `memrec evaluate` reproduces the test metrics.
    args = ["train", "--dataset", str(dataset), "--out", str(tmp_path), "--device", "cpu", "--stage"]
    args += ["finetune", "--from", str(model_dir), "--ft-epochs", "1", "--no-vote", "--transitions"]
    assert main(args) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    report = config["metrics"]["transitions"]
    table, chosen = report["valid"], report["chosen"]
    inference = json.loads((tmp_path / "inference.json").read_text())
    assert inference["transitions"] == chosen and chosen["weight"] > 0 and chosen["order"] == 1
    weights = [0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99]
    assert [(row["order"], row["weight"]) for row in table] == [(5, 0.0)] + [
        (order, w) for order in range(1, 6) for w in weights
    ]
    # the best NDCG@10 among the gains over off with HR@10 no lower (the guard) and z ≥ 2 (None: ∞)
    kept = [
        row
        for row in table[1:]
        if row["hr@10"] >= table[0]["hr@10"]
        and row["ndcg@10"] > table[0]["ndcg@10"]
        and (row["z"] is None or row["z"] >= 2.0)
    ]
    best = max(kept, key=lambda row: row["ndcg@10"])  # the first of the best
    assert (best["order"], best["weight"]) == (chosen["order"], chosen["weight"])
    assert report["z"] is None or report["z"] >= 2.0
    art = artifact.load(tmp_path)
    assert (
        art.bank is not None and art.bank.recent is not None and art.bank.recent.shape == (len(art.bank), 5)
    )
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path), "--dataset", str(dataset), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unmasked"] == config["metrics"]["test"]["unmasked"]
    off = report["test_without_transitions"]["unmasked"]
    assert out["unmasked"]["ndcg@10"] > off["ndcg@10"]
    # the learned hybrid was cross-fitted against the chosen channel; on these cycles the channel alone
    # ranks nearly every target first, and the hybrid is kept only by the channel's rule
    hybrid = config["metrics"]["hybrid"]
    channel_row, flat_row, gated_row = hybrid["valid"]
    assert [r["source"] for r in hybrid["valid"]] == [
        "channel",
        "hybrid without gates (2-fold cross-fit)",
        "hybrid with gates (2-fold cross-fit)",
    ]
    hybrid_row = gated_row if hybrid["gated"] else flat_row
    rule = hybrid_row["ndcg@10"] > channel_row["ndcg@10"] and hybrid_row["hr@10"] >= channel_row["hr@10"]
    assert hybrid["kept"] == (rule and hybrid["z"] >= 2.0) and hybrid["fitted"] is not None
    assert not hybrid["gated"] or hybrid["z_gates"] >= 2.0
    assert hybrid["gated"] or all(g == 0.0 for row in hybrid["fitted"]["gates"] for g in row)
    assert (inference["hybrid"] is not None) == hybrid["kept"]
