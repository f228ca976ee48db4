"""Interaction logs → dense ids → chronological leave-one-out splits → length-bucketed batches.

Two file formats are read:

* RecBole atomic ``.inter`` files (ml-100k): tab-separated, a typed header such as
  ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``. Rows are sorted by
  timestamp per user with a *stable* sort, so ties keep file order.
* Sequence ``.txt`` files (Amazon, Yelp, LastFM): ``user item item …`` per line, already in
  chronological order.

External ids are strings. Internal ids are dense: items ``1..n_items`` (0 is padding) and users
``0..n_users-1``, both in order of first appearance in the file. The :class:`Vocab` travels with every
trained model.

Split (METHODS §5): for a user with items ``s_0 … s_{n-1}`` the last item is the test target, the
second-last the validation target, and every earlier position ``t ≥ 1`` is a training pair
``(s_{max(0,t-L)} … s_{t-1}) → s_t``. Inputs are the last ``L`` (= 50) items before the target.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
PAD = 0

# Dataset name → file, relative to the data directory. A name that is not listed here may be given
# as a path to a `.inter` or `.txt` file directly.
KNOWN_DATASETS: dict[str, str] = {
    "ml-100k": "ml-100k/ml-100k.inter",
    "beauty": "beauty/Beauty.txt",
    "sports": "sports/Sports_and_Outdoors.txt",
    "toys": "toys/Toys_and_Games.txt",
    "yelp": "yelp/Yelp.txt",
    "lastfm": "lastfm/LastFM.txt",
}


class DataError(ValueError):
    """A malformed or unusable data file; the message names the file, the line and the problem."""


# ----------------------------------------------------------------------------------------------------
# Vocabulary: external string ids ↔ dense internal ids


@dataclass
class Vocab:
    """Maps external ids to dense internal ids. ``items[i-1]`` is the external id of item ``i``."""

    users: list[str]
    items: list[str]

    def __post_init__(self) -> None:
        self._user_index = {u: i for i, u in enumerate(self.users)}
        self._item_index = {it: i + 1 for i, it in enumerate(self.items)}
        if len(self._item_index) != len(self.items) or len(self._user_index) != len(self.users):
            raise DataError("vocabulary holds duplicate ids")

    @property
    def n_items(self) -> int:
        """Number of real items; the embedding table has ``n_items + 1`` rows (row 0 = padding)."""
        return len(self.items)

    def item_id(self, external: str) -> int:
        """Internal id of an external item id; KeyError for an unknown item."""
        return self._item_index[external]

    def item_ids(self, externals: Sequence[str]) -> IntArray:
        return np.fromiter((self._item_index[e] for e in externals), dtype=np.int64, count=len(externals))

    def external_item(self, internal: int) -> str:
        if not 1 <= internal <= len(self.items):
            raise KeyError(internal)
        return self.items[internal - 1]

    def user_id(self, external: str) -> int:
        return self._user_index[external]

    def has_item(self, external: str) -> bool:
        return external in self._item_index

    def to_json(self) -> dict[str, list[str]]:
        return {"users": self.users, "items": self.items}

    @classmethod
    def from_json(cls, obj: dict[str, list[str]]) -> Vocab:
        return cls(users=list(obj["users"]), items=list(obj["items"]))


@dataclass
class Interactions:
    """Every user's chronologically ordered item sequence, in internal ids."""

    name: str
    vocab: Vocab
    sequences: list[IntArray]  # sequences[u] = (n_u,) item ids, oldest first
    until: float | None = None  # the latest timestamp, where the data has timestamps (.inter files)
    source: str = ""  # the file read, absolute, when it is no known data set (those resolve by name)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def with_vocab(self, vocab: Vocab) -> Interactions:
        """The same interactions in another vocabulary's item ids (a trained model's); unknown items fail.
        Users keep this dataset's order."""
        if vocab.items == self.vocab.items:
            return self
        internal = np.array([0, *(vocab.item_id(e) if vocab.has_item(e) else -1 for e in self.vocab.items)])
        if (internal < 0).any():
            unknown = [self.vocab.items[i - 1] for i in np.flatnonzero(internal < 0)[:5]]
            raise DataError(f"{self.name}: items unknown to the model, e.g. {unknown}")
        sequences = [internal[s] for s in self.sequences]
        vocab_ = Vocab(self.vocab.users, vocab.items)
        return Interactions(self.name, vocab_, sequences, until=self.until, source=self.source)


# ----------------------------------------------------------------------------------------------------
# Loading


def resolve_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Dataset name (or a file path) → the file to read, under ``data_dir`` or ``$MEMREC_DATA_DIR``."""
    direct = Path(name)
    if direct.suffix in {".inter", ".txt"} and direct.is_file():
        return direct
    if name not in KNOWN_DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(KNOWN_DATASETS))} or a file path"
        )
    root = Path(data_dir or os.environ.get("MEMREC_DATA_DIR") or "data")
    path = root / KNOWN_DATASETS[name]
    if not path.is_file():
        raise DataError(
            f"dataset {name!r} not found: {path} does not exist (set --data-dir or MEMREC_DATA_DIR)"
        )
    return path


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Interactions:
    path = resolve_dataset(name, data_dir)
    data = load_inter(path) if path.suffix == ".inter" else load_sequences(path)
    data.name = name if name in KNOWN_DATASETS else path.stem
    data.source = "" if name in KNOWN_DATASETS else str(path.resolve())
    log.info(
        "loaded %s: %d users, %d items, %d interactions",
        data.name,
        data.n_users,
        data.vocab.n_items,
        data.n_interactions,
    )
    return data


class _IdMap:
    """First-appearance dense id assignment, starting at ``start``."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.index: dict[str, int] = {}

    def __call__(self, key: str) -> int:
        idx = self.index.get(key)
        if idx is None:
            idx = self.index[key] = len(self.index) + self.start
        return idx

    def keys(self) -> list[str]:
        return list(self.index)


def load_sequences(path: Path) -> Interactions:
    """Read a ``user item item …`` file. Every line must hold a user and at least one item."""
    users, items = _IdMap(0), _IdMap(1)
    sequences: list[IntArray] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                raise DataError(f"{path}:{lineno}: empty line")
            if len(tokens) < 2:
                raise DataError(f"{path}:{lineno}: user {tokens[0]!r} has no items")
            if tokens[0] in users.index:
                raise DataError(f"{path}:{lineno}: user {tokens[0]!r} appears on more than one line")
            users(tokens[0])
            sequences.append(np.array([items(t) for t in tokens[1:]], dtype=np.int64))
    if not sequences:
        raise DataError(f"{path}: no interactions")
    return Interactions(path.stem, Vocab(users.keys(), items.keys()), sequences)


def _parse_inter_header(path: Path, header: str) -> tuple[int, int, int]:
    """Column indexes of user, item and timestamp in a RecBole header like ``user_id:token``."""
    names = []
    for field in header.rstrip("\n").split("\t"):
        if ":" not in field:
            raise DataError(f"{path}:1: header field {field!r} is not of the form name:type")
        names.append(field.split(":", 1)[0])
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in names]
    if missing:
        raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
    return names.index("user_id"), names.index("item_id"), names.index("timestamp")


def inter_rows(path: Path) -> Iterator[tuple[str, str, float]]:
    """(user, item, timestamp) of each row of a RecBole atomic ``.inter`` file, in file order; a
    DataError names the line of a malformed one."""
    with path.open(encoding="utf-8") as f:
        header = f.readline()
        if not header:
            raise DataError(f"{path}: empty file")
        ucol, icol, tcol = _parse_inter_header(path, header)
        n_cols = header.count("\t") + 1
        for lineno, line in enumerate(f, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != n_cols:
                raise DataError(f"{path}:{lineno}: expected {n_cols} tab-separated fields, got {len(fields)}")
            user, item, ts = fields[ucol], fields[icol], fields[tcol]
            if not user or not item:
                raise DataError(f"{path}:{lineno}: empty user or item id")
            try:
                t = float(ts)
            except ValueError:
                raise DataError(f"{path}:{lineno}: timestamp {ts!r} is not a number") from None
            if not math.isfinite(t):
                raise DataError(f"{path}:{lineno}: timestamp {ts!r} is not finite")
            yield user, item, t


def load_inter(path: Path) -> Interactions:
    """Read a RecBole atomic ``.inter`` file and order each user's items by timestamp (stable)."""
    users, items = _IdMap(0), _IdMap(1)
    rows_u: list[int] = []
    rows_i: list[int] = []
    rows_t: list[float] = []
    for user, item, t in inter_rows(path):
        rows_u.append(users(user))
        rows_i.append(items(item))
        rows_t.append(t)
    if not rows_u:
        raise DataError(f"{path}: no interactions")
    u = np.array(rows_u, dtype=np.int64)
    # Stable sort by (user, timestamp): ties keep file order.
    order = np.lexsort((np.array(rows_t), u))
    item_sorted = np.array(rows_i, dtype=np.int64)[order]
    bounds = np.searchsorted(u[order], np.arange(len(users.index) + 1))
    sequences = [item_sorted[bounds[k] : bounds[k + 1]] for k in range(len(users.index))]
    return Interactions(path.stem, Vocab(users.keys(), items.keys()), sequences, max(rows_t))


# ----------------------------------------------------------------------------------------------------
# Leave-one-out split


@dataclass
class Samples:
    """A set of (input prefix → target) samples, right-padded to ``max_len``.

    ``inputs[i, :lengths[i]]`` are the last ≤ L items before ``targets[i]``, oldest first; the rest is
    padding. ``prefix_lens[i]`` is the full prefix length (not capped at L): the position of the target
    in the user's sequence, used by the memory bank's leakage rule.
    """

    inputs: IntArray  # (N, L)
    lengths: IntArray  # (N,)
    targets: IntArray  # (N,)
    users: IntArray  # (N,)
    prefix_lens: IntArray  # (N,)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, idx: IntArray) -> Samples:
        return Samples(
            self.inputs[idx], self.lengths[idx], self.targets[idx], self.users[idx], self.prefix_lens[idx]
        )


@dataclass
class Split:
    train: Samples
    valid: Samples
    test: Samples
    # Seen items per evaluation sample, as CSR over the sample index: every item the user interacted
    # with before the target (the whole prefix, not only the L-window). Used by the masked protocol.
    valid_seen: tuple[IntArray, IntArray]
    test_seen: tuple[IntArray, IntArray]


def _windows(seqs: list[IntArray], users: list[int], ends: list[int], max_len: int) -> Samples:
    """Samples whose targets are ``seqs[k][ends[k]]`` and inputs the ≤ max_len items before it."""
    n = len(ends)
    inputs = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    targets = np.zeros(n, dtype=np.int64)
    for k, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
        window = seq[max(0, end - max_len) : end]
        inputs[k, : len(window)] = window
        lengths[k] = len(window)
        targets[k] = seq[end]
    return Samples(inputs, lengths, targets, np.array(users, dtype=np.int64), np.array(ends, dtype=np.int64))


def seen_csr(seqs: list[IntArray], ends: list[int]) -> tuple[IntArray, IntArray]:
    prefixes = [seq[:end] for seq, end in zip(seqs, ends, strict=True)]
    indptr = np.zeros(len(prefixes) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(p) for p in prefixes])
    indices = np.concatenate(prefixes) if prefixes else np.zeros(0, dtype=np.int64)
    return indptr, indices.astype(np.int64)


def leave_one_out(data: Interactions, max_len: int = 50) -> Split:
    """Chronological leave-one-out split.

    A user with n items yields a test sample if n ≥ 2, a validation sample if n ≥ 3, and training
    samples for targets at positions 1 … n-3. Users with a single item contribute nothing.
    """
    tr_seqs: list[IntArray] = []
    tr_users: list[int] = []
    tr_ends: list[int] = []
    ev: dict[str, tuple[list[IntArray], list[int], list[int]]] = {"valid": ([], [], []), "test": ([], [], [])}
    for u, seq in enumerate(data.sequences):
        n = len(seq)
        for t in range(1, n - 2):
            tr_seqs.append(seq)
            tr_users.append(u)
            tr_ends.append(t)
        for name, end in (("valid", n - 2), ("test", n - 1)):
            if end >= 1:
                ev[name][0].append(seq)
                ev[name][1].append(u)
                ev[name][2].append(end)
    if not tr_ends:
        raise DataError(f"{data.name}: no training samples (every user has fewer than 4 items)")
    return Split(
        train=_windows(tr_seqs, tr_users, tr_ends, max_len),
        valid=_windows(*ev["valid"], max_len),
        test=_windows(*ev["test"], max_len),
        valid_seen=seen_csr(ev["valid"][0], ev["valid"][2]),
        test_seen=seen_csr(ev["test"][0], ev["test"][2]),
    )


def first_items(data: Interactions) -> IntArray:
    """(n_users,) each user's first item, 0 for a user with a single item (no sample at all).

    It is the one item of a user's training + validation sequence that is no memory's value, so a model
    directory keeps it beside its bank: the service rebuilds each known user's history from the two,
    the very history the offline test sample reads.
    """
    return np.array([int(seq[0]) if len(seq) >= 2 else 0 for seq in data.sequences], dtype=np.int64)


def window_samples(train: Samples, max_len: int) -> IntArray:
    """Training samples whose windows tile every training target exactly once (SASRec's scheme).

    A user's training targets sit at positions 1 … e. The sample ending at e predicts e from
    s[e-L … e-1]; read at every position, that window also predicts s[e-L+1 … e-1]. So the samples
    ending at e, e-L, e-2L, … together cover each target once, with one forward pass per window.
    """
    last_end = np.zeros(int(train.users.max()) + 1, dtype=np.int64)
    np.maximum.at(last_end, train.users, train.prefix_lens)
    keep = (last_end[train.users] - train.prefix_lens) % max_len == 0
    return np.flatnonzero(keep).astype(np.int64)


def all_position_targets(inputs: IntArray, lengths: IntArray, targets: IntArray) -> IntArray:
    """Next-item target at every position of right-padded windows: (B, T), 0 at padding."""
    out = np.zeros_like(inputs)
    out[:, :-1] = inputs[:, 1:]
    out[np.arange(len(lengths)), lengths - 1] = targets
    return out


# ----------------------------------------------------------------------------------------------------
# Same-target positives (DuoRec's supervised views)


class SameTargetIndex:
    """For each training sample, draws another sample with the same target item (itself if none)."""

    def __init__(self, targets: IntArray) -> None:
        self.order = np.argsort(targets, kind="stable")  # samples grouped by target
        sorted_targets = targets[self.order]
        uniq, start, count = np.unique(sorted_targets, return_index=True, return_counts=True)
        group = np.searchsorted(uniq, targets)
        self.start = start[group]  # (N,) first slot of each sample's group in `order`
        self.count = count[group]  # (N,) group size
        self.rank = np.empty_like(self.order)  # (N,) slot of each sample inside its group
        self.rank[self.order] = np.arange(len(targets)) - start[np.searchsorted(uniq, sorted_targets)]

    def sample(self, idx: IntArray, rng: np.random.Generator) -> IntArray:
        """Indexes of a random *other* sample with the same target, for each sample in ``idx``."""
        count = self.count[idx]
        # Draw uniformly among the count-1 others, skipping the sample itself.
        r = (rng.random(len(idx)) * np.maximum(count - 1, 1)).astype(np.int64)
        r = np.where(r >= self.rank[idx], r + 1, r)
        r = np.where(count > 1, r, self.rank[idx])  # a lone sample is its own positive
        positives: IntArray = self.order[self.start[idx] + r]
        return positives


# ----------------------------------------------------------------------------------------------------
# Batching


def bucket_batches(
    lengths: IntArray, batch_size: int, rng: np.random.Generator | None, chunk_batches: int = 64
) -> Iterator[IntArray]:
    """Batches of sample indexes with similar lengths, so trimming to the batch maximum wastes little.

    Shuffles, cuts the permutation into chunks of ``chunk_batches`` batches, sorts each chunk by
    length, cuts it into batches and shuffles the batch order: most padding disappears while each
    batch still mixes users from the whole dataset. With ``rng=None`` (evaluation) the order is a plain
    length sort.
    """
    n = len(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        for s in range(0, n, batch_size):
            yield order[s : s + batch_size]
        return
    perm = rng.permutation(n)
    chunk = batch_size * chunk_batches
    batches: list[IntArray] = []
    for s in range(0, n, chunk):
        part = perm[s : s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[b : b + batch_size] for b in range(0, len(part), batch_size))
    for b in rng.permutation(len(batches)):
        yield batches[b]
