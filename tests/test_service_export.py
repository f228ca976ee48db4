"""`memrec export`, end to end on both backends: the interactions the service accepted (a retried event
once, a new item under its external id, none of the memory bank's rows) come out as a RecBole ``.inter``
file, alone or after the model's training data; an erased user's rows do not; and `memrec train
--init-from` reads the export as it is, starting every known item at its trained row, bit for bit."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_service_support import (  # noqa: F401  (fixtures)
    model_dir,
    running_app,
    service_redis,
    toy_root,
)

from model import artifact
from model.data import load_dataset, load_sequences
from service.app import store_config
from service.cli import main
from service.export import HEADER
from service.settings import Settings

T0 = 1_700_000_000.0
# (user, item, timestamp, event id): w1 is new to the service, u3 a user of the training data
BATCHES = [
    [("w1", "i3", T0, "e0"), ("w1", "sku-new", T0 + 1, "e1"), ("u3", "i7", T0 + 2, "e2")],
    [("w1", "sku-new", T0 + 1, "e1"), ("u3", "sku-new", T0 + 3, "e3"), ("w2", "i9", T0 + 4, None)],
]
# e1's retry is no new interaction; the log holds the rows in the order they were written (within a
# batch a user's first event, which has no memory, is written before the others' events)
ACCEPTED = sorted(row[:3] for row in BATCHES[0] + BATCHES[1][1:])


def backend_settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, model: Path
) -> dict[str, Any]:
    settings: dict[str, Any] = {"model_dir": model, "store_dir": tmp_path / "store"}
    if backend == "redis":
        settings["redis_url"] = request.getfixturevalue("service_redis")
    return settings


async def post(settings: dict[str, Any], erase: str | None = None) -> None:
    """The batches through the API (accept mode: sku-new is registered), then an erasure if asked."""
    async with running_app(**settings, snapshot_interval_s=0) as (_, client):
        for batch in BATCHES:
            events = [
                {"user_id": u, "item_id": i, "timestamp": t, **({"event_id": e} if e else {})}
                for u, i, t, e in batch
            ]
            r = await client.post("/interactions", json={"events": events})
            assert r.status_code == 200, r.text
        if erase is not None:
            assert (await client.delete(f"/users/{erase}")).status_code == 200


def export_args(settings: dict[str, Any], out: Path, *extra: str) -> list[str]:
    args = ["export", "--model", str(settings["model_dir"]), "--out", str(out)]
    args += ["--store-dir", str(settings["store_dir"])]
    if "redis_url" in settings:
        args += ["--redis-url", settings["redis_url"]]
    return [*args, *extra]


async def export_cli(args: list[str]) -> int:
    """`memrec export` in this process (in a thread: the command runs its own event loop)."""
    return await asyncio.to_thread(main, args)


def rows(path: Path) -> list[tuple[str, str, float]]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines[0] == HEADER
    return [(u, i, float(t)) for u, i, t in (line.rstrip("\n").split("\t") for line in lines[1:])]


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_export_holds_exactly_the_accepted_interactions(
    backend: str,
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = backend_settings(backend, tmp_path, request, model_dir)
    await post(settings)
    capsys.readouterr()
    assert await export_cli(export_args(settings, tmp_path / "log.inter")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(rows(tmp_path / "log.inter")) == ACCEPTED
    assert summary["logged_rows"] == len(ACCEPTED) and summary["training_rows"] == 0
    assert summary["skipped_rows"] == 0 and summary["position"]
    # an export of what came after: nothing yet
    assert (
        await export_cli(export_args(settings, tmp_path / "none.inter", "--after", summary["position"])) == 0
    )
    assert rows(tmp_path / "none.inter") == []

    # with the training data first: the toy .txt file's rows, timed before the log's earliest
    assert await export_cli(export_args(settings, tmp_path / "all.inter", "--with-training-data")) == 0
    merged, train = rows(tmp_path / "all.inter"), load_sequences(model_dir.parent / "toy.txt")
    assert (
        len(merged) == train.n_interactions + len(ACCEPTED) and sorted(merged[-len(ACCEPTED) :]) == ACCEPTED
    )
    assert max(t for _, _, t in merged[: -len(ACCEPTED)]) < T0
    data = load_dataset(str(tmp_path / "all.inter"))  # what `memrec train --dataset` reads
    u3 = train.sequences[train.vocab.user_id("u3")]
    assert [data.vocab.items[i - 1] for i in data.sequences[data.vocab.user_id("u3")]] == [
        *(train.vocab.items[i - 1] for i in u3),
        "i7",
        "sku-new",
    ]


async def test_an_erased_user_is_not_exported_and_the_cli_runs_as_a_process(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    settings = backend_settings("redis", tmp_path, request, model_dir)
    await post(settings, erase="w1")
    out = tmp_path / "log.inter"
    cmd = [sys.executable, "-m", "service.cli", *export_args(settings, out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(rows(out)) == [row for row in ACCEPTED if row[0] != "w1"]
    assert json.loads(done.stdout)["logged_rows"] == 3


async def test_export_of_an_embedded_store_in_use_is_refused(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = backend_settings("embedded", tmp_path, request, model_dir)
    async with running_app(**settings, snapshot_interval_s=0):
        with caplog.at_level(logging.ERROR):
            assert await export_cli(export_args(settings, tmp_path / "x.inter")) == 2
    assert "in use by another process" in caplog.text and not (tmp_path / "x.inter").exists()


def test_the_retention_setting_reaches_the_store(model_dir: Path) -> None:  # noqa: F811
    def retention(days: float | None) -> float | None:
        return store_config(
            Settings(model_dir=model_dir, log_retention_days=days), 8, "v", 40
        ).log_retention_s

    assert retention(None) is None and retention(0) is None and retention(0.5) == 43_200


async def test_train_init_from_reads_an_export_with_new_items(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    settings = backend_settings("embedded", tmp_path, request, model_dir)
    await post(settings)
    export = tmp_path / "export.inter"
    assert await export_cli(export_args(settings, export, "--with-training-data")) == 0
    out = tmp_path / "retrained"
    args = ["train", "--dataset", str(export), "--out", str(out), "--init-from", str(model_dir)]
    args += ["--stage", "pretrain", "--epochs", "1", "--lr", "0", "--threads", "1", "--device", "cpu"]
    assert await asyncio.to_thread(main, args) == 0  # lr 0: what comes out is what training started from
    base, warm = artifact.load(model_dir), artifact.load(out)
    assert warm.vocab.n_items == base.vocab.n_items + 1 and warm.vocab.has_item("sku-new")
    assert warm.dataset_file == str(export.resolve())  # the next export finds this training data
    # the last timestamp trained on: a server moving to this model replays only what came after
    assert warm.data_until == max(float(line.split("\t")[2]) for line in export.read_text().splitlines()[1:])
    assert base.data_until is None  # the toy data set has no timestamps
    old, new = base.encoder.item_emb.weight, warm.encoder.item_emb.weight
    for item in base.vocab.items:  # every known item's row, bit for bit, wherever it now sits
        assert torch.equal(new[warm.vocab.item_id(item)], old[base.vocab.item_id(item)])
    assert "w1" in warm.vocab.users and "u3" in warm.vocab.users
