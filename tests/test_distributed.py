"""Data-parallel training under torchrun (model.distributed): two CPU processes (Gloo) train the toy data
set of tests/test_cli.py through `memrec train`, encoder and fine-tuning, and write one model directory
that loads and reproduces its test metrics; each process trains on its own half of every epoch; both
stop at the same epoch; the validation metric is the one-process run's within noise; an interrupted
two-process run resumed with --resume ends with exactly the weights of an uninterrupted one; and the
image's entrypoint runs two "pods" that meet at a c10d rendezvous, as the Kubernetes training Job does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import free_port

from model import artifact
from model.distributed import SINGLE, Dist, backend, epoch_rngs, fingerprint, from_env, shard
from model.threads import choose_threads
from service.cli import main

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 5
FT_EPOCHS, FT_PATIENCE = 10, 2  # the toy's fine-tuning peaks at once: it stops early, well before 10
# The two-process run keeps the one-process run's effective batch (2 × 128 = 256, 2 × 512 = 1024), so
# both take the same number of steps per epoch and should learn alike (docs/deployment.md).
TRAIN = ["--device", "cpu", "--threads", "1", "--epochs", str(EPOCHS), "--k", "5"]
TRAIN += ["--ft-epochs", str(FT_EPOCHS), "--ft-patience", str(FT_PATIENCE)]
HALF_BATCHES = ["--batch-size", "128", "--ft-batch-size", "512"]
# The noise of the toy's validation NDCG@10 after 5 epochs: one process, seeds 0-4, gave 0.5605, 0.5183,
# 0.5278, 0.5165 and 0.5472 (std 0.019), so two runs that differ only in their randomness differ by
# about 0.019 · √2 = 0.027; the bound is three of those. (Two processes with the same seeds gave
# 0.5602, 0.5355, 0.5306, 0.5416, 0.5525: within 0.025 of one process each time.)
NOISE = 0.08
SHARD_LINE = re.compile(  # rank, stage, epoch, the process's samples, the epoch's, their fingerprint
    r"\[(\d)/2\] model\.distributed: (epoch|fine-tune epoch) (\d+): "
    r"process \d of 2 trains on (\d+) of (\d+) samples \(fingerprint ([0-9a-f]{16})\)"
)


def toy_dataset(path: Path) -> Path:
    """The toy of tests/test_cli.py: users walking a 15-item cycle, with external string ids."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(120):
        start = int(rng.integers(0, 15))
        items = [f"sku-{(start + k) % 15}" for k in range(int(rng.integers(5, 12)))]
        lines.append(f"user-{u} " + " ".join(items))
    path.write_text("\n".join(lines) + "\n")
    return path


def training_pairs(dataset: Path) -> int:
    """Training samples of the leave-one-out split: a user of n items has n - 3 (the last two are the
    validation and test targets, the first item is never a target)."""
    return sum(len(line.split()) - 1 - 3 for line in dataset.read_text().splitlines())


@dataclass
class Run:
    """A finished `memrec train` under torchrun: its exit status, stdout and log."""

    code: int
    stdout: str
    log: str

    def shards(self, stage: str) -> dict[int, dict[int, tuple[int, int, int]]]:
        """{epoch: {rank: (samples it trained on, samples in the epoch, their fingerprint)}} of a
        ``stage`` ("epoch": the encoder's, "fine-tune epoch") from the processes' log lines."""
        found: dict[int, dict[int, tuple[int, int, int]]] = {}
        for rank, what, epoch, mine, total, digest in SHARD_LINE.findall(self.log):
            if what == stage:
                found.setdefault(int(epoch), {})[int(rank)] = (int(mine), int(total), int(digest, 16))
        return found


def torchrun(args: list[str]) -> Run:
    """`memrec train ARGS` in two processes on this machine (a free port, Gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "service.cli", "train", *args]
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK"}}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_dataset(tmp_path_factory.mktemp("data") / "toy.txt")


@pytest.fixture(scope="module")
def one_process(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The metrics of the one-process run (the plain path, in this process)."""
    out = tmp_path_factory.mktemp("one") / "model"
    assert main(["train", "--dataset", str(toy), "--out", str(out), *TRAIN]) == 0
    metrics: dict[str, Any] = json.loads((out / "config.json").read_text())["metrics"]
    return metrics


@pytest.fixture(scope="module")
def two_processes(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """The same command with half the batch under torchrun --nproc-per-node 2; its run and the folder
    that holds nothing but its model directory."""
    parent = tmp_path_factory.mktemp("two")
    run = torchrun(["--dataset", str(toy), "--out", str(parent / "model"), *TRAIN, *HALF_BATCHES])
    assert run.code == 0, run.log[-4000:]
    return run, parent


def test_two_processes_write_one_model_directory_that_loads(
    two_processes: tuple[Run, Path], toy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, parent = two_processes
    assert [p.name for p in parent.iterdir()] == ["model"]  # one directory, written by rank 0 alone
    model = parent / "model"
    assert sorted(p.name for p in model.iterdir()) == [
        "checkpoints",
        "config.json",
        "fusion.safetensors",
        "inference.json",
        "memory.safetensors",
        "model.safetensors",
        "vocab.json",
    ]
    assert [p.name for p in (model / "checkpoints").iterdir()] == ["checkpoint.pt"]
    printed = json.loads(run.stdout)  # one JSON document: only rank 0 prints its metrics
    assert printed["processes"] == 2 and printed["encoder"]["processes"] == 2
    assert printed["encoder"]["epochs_run"] == EPOCHS
    art = artifact.load(model)
    assert art.fusion is not None and art.bank is not None
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--dataset", str(toy), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["unmasked"] == printed["test"]["unmasked"]


def test_each_process_trains_on_its_own_half_of_every_epoch(
    two_processes: tuple[Run, Path], toy: Path
) -> None:
    run, _ = two_processes
    total = training_pairs(toy)
    assert total % 2 == 1  # the toy's 637 pairs: one sample per epoch waits for another permutation
    whole = fingerprint(np.arange(total))
    one = [fingerprint(np.array([i])) for i in range(total)]
    encoder, fusion = run.shards("epoch"), run.shards("fine-tune epoch")
    assert sorted(encoder) == list(range(1, EPOCHS + 1))
    assert fusion and sorted(fusion) == list(range(1, len(fusion) + 1))
    left_out = []
    for epoch in [*encoder.values(), *fusion.values()]:
        # both processes, each on half of the whole set (not all of it) ...
        assert sorted(epoch) == [0, 1]
        assert [epoch[r][:2] for r in (0, 1)] == [(total // 2, total)] * 2
        # ... and not the same half: the two fingerprints add up to the whole set's but for one sample
        joined = (epoch[0][2] + epoch[1][2]) % 2**64
        missing = [i for i in range(total) if (joined + one[i]) % 2**64 == whole]
        assert len(missing) == 1, "the shards are not disjoint"
        left_out.append(missing[0])
    assert len(set(left_out)) > 1  # a new permutation every epoch leaves out another sample


def test_both_processes_stop_at_rank_0s_epoch(two_processes: tuple[Run, Path]) -> None:
    run, _ = two_processes
    printed = json.loads(run.stdout)
    # Rank 0 alone validates; fine-tuning stopped early, after `patience` epochs without improvement,
    # and the other process ran exactly as many epochs (it waits for rank 0's count every epoch).
    epochs_run = printed["epochs_run"]
    assert epochs_run == printed["best_epoch"] + FT_PATIENCE < FT_EPOCHS
    fusion = run.shards("fine-tune epoch")
    assert sorted(fusion) == list(range(1, epochs_run + 1)) and all(len(c) == 2 for c in fusion.values())
    validated = re.findall(r"\[(\d)/2\] model\.finetune: fine-tune epoch \d+ loss", run.log)
    assert validated == ["0"] * epochs_run  # only rank 0 validates, once per epoch


def test_validation_matches_one_process_within_noise(
    two_processes: tuple[Run, Path], one_process: dict[str, Any]
) -> None:
    two = json.loads(two_processes[0].stdout)
    one_ndcg = one_process["encoder"]["valid"]["unmasked"]["ndcg@10"]
    two_ndcg = two["encoder"]["valid"]["unmasked"]["ndcg@10"]
    assert one_ndcg > 0.4  # both learned the cycles (an untrained encoder ranks at random: ~0.2)
    assert abs(two_ndcg - one_ndcg) < NOISE, (one_ndcg, two_ndcg)
    assert abs(two["valid"]["unmasked"]["hr@10"] - one_process["valid"]["unmasked"]["hr@10"]) < NOISE


def test_resume_continues_a_two_process_run_exactly(
    two_processes: tuple[Run, Path], toy: Path, tmp_path: Path
) -> None:
    # The same encoder training stopped after 3 epochs, then resumed to 5: every process draws its
    # shard and dropout from the seed and the epoch, so the weights are the uninterrupted run's.
    base = ["--dataset", str(toy), "--out", str(tmp_path / "m"), "--stage", "pretrain", *TRAIN, *HALF_BATCHES]
    first = torchrun([*base, "--epochs", "3"])
    assert first.code == 0, first.log[-4000:]
    resumed = torchrun([*base, "--epochs", str(EPOCHS), "--resume"])
    assert resumed.code == 0, resumed.log[-4000:]
    assert sorted(resumed.shards("epoch")) == [4, 5]  # both processes went on from epoch 4
    assert json.loads(resumed.stdout)["epochs_run"] == EPOCHS  # the history counts the first session
    weights = artifact.load(tmp_path / "m").encoder.state_dict()
    straight = artifact.load(two_processes[1] / "model").encoder.state_dict()
    assert all(torch.equal(weights[k], straight[k]) for k in straight)


def test_two_pods_meet_at_a_c10d_rendezvous_through_the_entrypoint(toy: Path, tmp_path: Path) -> None:
    # What k8s/train-job.yaml's two pods run, here as two local processes: the image's entrypoint with
    # torchrun's PET_* variables and the Indexed Job's JOB_COMPLETION_INDEX. Pod 0's agent hosts the
    # rendezvous store; pod 0 moves the model into place, pod 1 only trains.
    wrapper = tmp_path / "memrec"  # the image's `memrec` command, with this checkout importable
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m service.cli "$@"\n')
    wrapper.chmod(0o755)
    models = tmp_path / "models"
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # torchrun
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "MEMREC_BIN": str(wrapper),
        "MEMREC_DATASET": str(toy),
        "MEMREC_DATA_DIR": str(tmp_path / "data"),
        "MEMREC_MODEL_DIR": str(models / "current"),
        "MEMREC_TRAIN_ARGS": "--epochs 2 --ft-epochs 1 --k 5 --threads 1 --device cpu",
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "PET_RDZV_ID": "memrec-train",
    }
    entrypoint = ["bash", str(ROOT / "docker" / "entrypoint.sh"), "train"]
    pods = [
        subprocess.Popen(
            entrypoint,
            env={**env, "JOB_COMPLETION_INDEX": str(index)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in (0, 1)
    ]
    logs = [pod.communicate(timeout=300)[1] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # published as the entrypoint publishes every version: versions/<time>/ and the link current to it
    assert sorted(p.name for p in models.iterdir()) == ["current", "versions"]
    assert (models / "current").is_symlink() and len(list((models / "versions").iterdir())) == 1
    assert not list(models.rglob("*.partial"))  # nothing half-written left
    assert not (models / "current" / "checkpoints").exists()
    assert json.loads((models / "current" / "config.json").read_text())["metrics"]["processes"] == 2
    assert "pod 1 trained its share" in logs[1] and "trained its share" not in logs[0]


# ------------------------------------------------------------------------------ the pieces alone


def test_fingerprints_of_disjoint_sets_add_up() -> None:
    idx = np.random.default_rng(0).permutation(1000)
    parts = fingerprint(idx[:400]) + fingerprint(idx[400:])
    assert parts % 2**64 == fingerprint(np.arange(1000)) == fingerprint(idx[::-1])  # order-free
    assert (2 * fingerprint(idx[:500])) % 2**64 != fingerprint(idx)  # one half twice is not the whole


@pytest.mark.parametrize(("n", "world"), [(637, 2), (10, 3), (5, 5), (3, 4)])
def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder(n: int, world: int) -> None:
    shards = [shard(n, np.random.default_rng(7), Dist(rank, world)) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # as many batches on every process
    joined = np.concatenate(shards)
    assert len(set(joined.tolist())) == len(joined) == n - n % world  # disjoint, all but < N left out
    # every process cut the same permutation: the shards interleave it
    perm = np.random.default_rng(7).permutation(n)
    assert all(np.array_equal(s, perm[r : n - n % world : world]) for r, s in enumerate(shards))


def test_epoch_generators_are_shared_or_own_by_rank() -> None:
    shared0, own0 = epoch_rngs(1, 3, Dist(0, 2))
    torch0 = torch.rand(3)
    shared1, own1 = epoch_rngs(1, 3, Dist(1, 2))
    torch1 = torch.rand(3)
    assert np.array_equal(shared0.permutation(50), shared1.permutation(50))  # the same permutation
    assert not np.array_equal(own0.permutation(50), own1.permutation(50))  # the own draws differ
    assert not torch.equal(torch0, torch1)  # and so does dropout
    again, _ = epoch_rngs(1, 4, Dist(0, 2))
    assert not np.array_equal(epoch_rngs(1, 3, SINGLE)[0].permutation(50), again.permutation(50))


def test_the_place_comes_from_torchruns_environment() -> None:
    assert from_env({}) == SINGLE and not SINGLE.on and SINGLE.main
    assert from_env({"WORLD_SIZE": "1", "RANK": "0"}) == SINGLE  # torchrun with one process: the plain path
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert from_env(env) == Dist(3, 4, 1, 2) and from_env(env).on and not from_env(env).main
    assert (backend("cpu"), backend("cuda")) == ("gloo", "nccl")


@pytest.mark.parametrize(
    ("cores", "load", "processes", "expected"),
    [(16, 0.0, 2, 8), (16, 4.4, 2, 6), (2, 1.0, 2, 1), (2, 0.0, 4, 1), (8, 0.0, 1, 8)],
)
def test_the_free_cores_are_shared_by_the_processes_of_a_machine(
    cores: int, load: float, processes: int, expected: int
) -> None:
    assert choose_threads(None, cores=cores, load=load, processes=processes) == expected
    assert choose_threads(3, cores=cores, load=load, processes=processes) == 3  # --threads is per process
