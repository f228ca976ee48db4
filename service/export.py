"""``memrec export``: the store's interaction log as a RecBole atomic ``.inter`` file, which `memrec
train --dataset FILE` reads as it is (``model.data.load_inter``), optionally after the model's own
training data.

Rows are ``user_id:token  item_id:token  timestamp:float`` with the items' external ids: the model's
vocabulary names its own items, the store's registry (``register_items``) the items first seen after
training; the store logs internal ids and knows no vocabulary, the model knows no registry, so the two
meet here (``service.routes.items.ItemNames``, the service's own mapping). The store is the one `memrec
serve` opens for the model (``service.app.store_config``: Redis when ``MEMREC_REDIS_URL`` is set, else
the embedded store in ``MEMREC_STORE_DIR``; the model version's namespace unless ``MEMREC_NAMESPACE``
names one). Redis is read while replicas serve; the embedded store belongs to one process, so export it
while the server is stopped.

With the training data (``--with-training-data``) every row of the data set the model was trained on
comes first: a known data set (``model.data.KNOWN_DATASETS``) under the data directory, or the file the
model directory names (``Artifact.dataset_file``). A RecBole ``.inter`` data set keeps its timestamps. A
sequence ``.txt`` data set (the Amazon, Yelp and LastFM files) has none: its rows get synthetic ones, one
second apart in file order and all before the earliest logged timestamp (0 with an empty log), so each
user's training sequence precedes their logged interactions once ``load_inter`` orders by time.

A row whose user or item id holds a tab or a line break cannot be written in the format; it is skipped
and counted, as is a row of an item neither the vocabulary nor the registry knows (never, in a
namespace of this model's). The file is written beside its path and renamed into place when complete.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from memory_store import MemoryStore, open_store
from memory_store.base import LoggedInteractions
from model import artifact
from model.data import KNOWN_DATASETS, DataError, Vocab, inter_rows, load_sequences, resolve_dataset
from service.app import store_config
from service.routes.items import ItemNames
from service.settings import Settings

log = logging.getLogger(__name__)

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"
PAGE = 10_000  # log rows per store read
_NOT_IN_TOKENS = ("\t", "\n", "\r")


@dataclass
class LogExport:
    """What was written of the log: rows, rows skipped, the earliest timestamp, the last position."""

    rows: int = 0
    skipped: int = 0
    earliest: float = math.inf
    position: str = ""


def training_file(art: artifact.Artifact, data_dir: Path | None, override: Path | None = None) -> Path:
    """The data set ``art`` was trained on (``override``: another file); a DataError when it is gone."""
    if override is not None:
        return resolve_dataset(str(override), data_dir)
    if art.dataset in KNOWN_DATASETS:
        return resolve_dataset(art.dataset, data_dir)
    if art.dataset_file and Path(art.dataset_file).is_file():
        return Path(art.dataset_file)
    where = f" ({art.dataset_file})" if art.dataset_file else ""
    raise DataError(
        f"the training data of model {art.model_version}, {art.dataset!r}{where}, is not found: "
        "pass --training-data FILE"
    )


def training_rows(path: Path, before: float) -> Iterator[tuple[str, str, float]]:
    """(user, item, timestamp) of every row of a data set file; a ``.txt`` file's timestamps are made up:
    one second apart, in file order, the last one at ``before - 1``."""
    if path.suffix == ".inter":
        yield from inter_rows(path)
        return
    data = load_sequences(path)
    t = before - data.n_interactions
    for user, seq in zip(data.vocab.users, data.sequences, strict=True):
        for item in seq.tolist():
            yield user, data.vocab.items[item - 1], t
            t += 1.0


def _writable(*ids: str) -> bool:
    return not any(c in s for s in ids for c in _NOT_IN_TOKENS)


def _write_page(page: LoggedInteractions, names: ItemNames, out: TextIO, done: LogExport) -> list[int]:
    """Write the rows whose item ``names`` knows; the indices of the others (to retry with a newer
    registry)."""
    unknown: list[int] = []
    for row, (user, item, ts) in enumerate(
        zip(page.users, page.items.tolist(), page.timestamps.tolist(), strict=True)
    ):
        try:
            name = names.external(item)
        except KeyError:
            unknown.append(row)
            continue
        if not _writable(user, name):
            done.skipped += 1
            continue
        out.write(f"{user}\t{name}\t{ts!r}\n")
        done.rows += 1
        done.earliest = min(done.earliest, ts)
    return unknown


async def _names(store: MemoryStore, vocab: Vocab) -> ItemNames:
    """The item names as the store knows them now (with Redis, once this replica has applied the log)."""
    status = await store.replication()
    await store.wait_applied(status.last, 10.0)
    registered = await store.new_items()
    return ItemNames(vocab, registered, {i: name for name, i in registered.items()})


async def write_log(
    store: MemoryStore, vocab: Vocab, out: TextIO, after: str = "", page_size: int = PAGE
) -> LogExport:
    """Every row of the store's log after position ``after`` into ``out``, page by page, until a page
    comes back short (rows accepted meanwhile may be in it or not)."""
    done = LogExport(position=after)
    names = await _names(store, vocab)
    with tqdm(desc="export", unit=" rows", disable=None) as bar:
        while True:
            page = await store.interactions(done.position, page_size)
            if not len(page):
                break
            unknown = _write_page(page, names, out, done)
            if unknown:  # items registered since the registry was read
                names = await _names(store, vocab)
                skipped = len(_write_page(_rows(page, unknown), names, out, done))
                done.skipped += skipped
            done.position = page.position
            bar.update(len(page))
            if len(page) < page_size:
                break
    return done


def _rows(page: LoggedInteractions, rows: list[int]) -> LoggedInteractions:
    """The page's ``rows`` only."""
    return LoggedInteractions(
        users=tuple(page.users[r] for r in rows),
        items=page.items[rows],
        timestamps=page.timestamps[rows],
        event_ids=tuple(page.event_ids[r] for r in rows),
        accepted_at=page.accepted_at[rows],
        positions=tuple(page.positions[r] for r in rows),
    )


def _write_training(path: Path, before: float, out: TextIO) -> tuple[int, int]:
    """The data set's rows into ``out``; (rows written, rows skipped)."""
    written = skipped = 0
    for user, item, ts in training_rows(path, before):
        if _writable(user, item):
            out.write(f"{user}\t{item}\t{ts!r}\n")
            written += 1
        else:
            skipped += 1
    return written, skipped


async def export(
    settings: Settings,
    out: Path,
    with_training_data: bool = False,
    training_data: Path | None = None,
    after: str = "",
    page_size: int = PAGE,
) -> dict[str, Any]:
    """Write ``out`` (see the module) and return a summary: rows of the log and of the training data,
    rows skipped, the log position of the last row (``after`` of an export of what came since)."""
    t0 = time.perf_counter()
    art = artifact.load(settings.model_dir, "cpu")
    source = training_file(art, settings.data_dir, training_data) if with_training_data else None
    config = store_config(settings, art.encoder.cfg.dim, art.model_version, art.vocab.n_items)
    out.parent.mkdir(parents=True, exist_ok=True)
    body, partial = out.with_name(out.name + ".log.partial"), out.with_name(out.name + ".partial")
    store = await open_store(config)
    try:
        with body.open("w", encoding="utf-8") as f:
            logged = await write_log(store, art.vocab, f, after, page_size)
    finally:
        await store.close()
    training = training_skipped = 0
    with partial.open("w", encoding="utf-8") as f:
        f.write(HEADER)
        if source is not None:
            before = logged.earliest if logged.rows else 0.0
            training, training_skipped = _write_training(source, before, f)
        with body.open(encoding="utf-8") as b:
            shutil.copyfileobj(b, f)
    body.unlink()
    partial.replace(out)
    summary = {
        "out": str(out),
        "model_version": art.model_version,
        "namespace": config.namespace,
        "logged_rows": logged.rows,
        "training_rows": training,
        "training_data": str(source) if source is not None else None,
        "skipped_rows": (skipped := logged.skipped + training_skipped),
        "position": logged.position,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if skipped:
        log.warning("%d rows skipped: a tab or line break in an id, or an unknown item", skipped)
    log.info(
        "exported %d logged and %d training rows of namespace %s to %s",
        logged.rows,
        training,
        config.namespace,
        out,
    )
    return summary
