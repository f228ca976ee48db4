"""IVF indexes whose inverted lists the memory index handles itself: the compressed kinds, and adds,
removals and regrows without a FAISS direct map.

Kinds (``IndexParams.kind``; bytes per vector at dim 64, plus 8 for its id in the lists):

* ``ivf_flat``  float32 codes, 256 bytes: the vectors themselves.
* ``ivf_fp16``  half floats, 128 bytes.
* ``ivf_sq8``   one byte per dimension, 64 bytes; each dimension's range is trained once, on the sample
  of the first IVF build (FAISS ``ScalarQuantizer.QT_8bit``).

Codes encode the vector itself, never its residual to a list's centroid (FAISS's ``by_residual`` off),
so a code does not depend on the list that holds it: a regrow to more lists trains only a new coarse
quantiser (on decoded vectors) and moves every code bit for bit into its new list. Nothing is
quantised twice, however often the index regrows. (Residual codes are a little more accurate at the
same size, 0.953 against 0.949 recall@20 for SQ8 on Beauty encoder states at 1M, but every regrow would
re-quantise decoded vectors.)

FAISS's own removal needs a direct map (an id → list, offset table: about 40 bytes per vector as a
hashtable, more than an SQ8 code) or a scan of every list. Instead the caller keeps each vector's list
number (the memory index's ``lists`` column, 4 bytes) and a removal compacts only the lists concerned.
Search and ``search_and_reconstruct`` need no direct map.

Not offered, measured at 1M Beauty encoder states (reports/index_scale.md): IVF-PQ (16 or 32 bytes,
recall@20 0.63 / 0.84 at nprobe 16 even with residual codes) and 6- or 4-bit scalar quantisation
(0.88 / 0.68), all short of 0.9; and HNSW, whose FAISS indexes cannot remove a vector (no
``remove_ids``), which eviction and erasure need, and whose graph alone (32 neighbour ids per vector
at M = 16) costs twice an SQ8 code.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator

import faiss
import numpy as np

from memory_store.config import IndexKind, IndexParams

# The scalar quantiser type of each compressed kind; ivf_flat has none.
_SQ_TYPES = {"ivf_fp16": faiss.ScalarQuantizer.QT_fp16, "ivf_sq8": faiss.ScalarQuantizer.QT_8bit}
_KIND_OF_SQ = {int(qt): kind for kind, qt in _SQ_TYPES.items()}
_SUFFIX = {"ivf_flat": "", "ivf_fp16": "-fp16", "ivf_sq8": "-sq8"}
CHUNK = 262_144  # vectors decoded or encoded at a time: bounds the transient float32 copies

log = logging.getLogger(__name__)


def create(kind: IndexKind, dim: int, nlist: int, params: IndexParams) -> faiss.IndexIVF:
    """An untrained inner-product IVF index of ``kind`` with ``nlist`` lists."""
    quantizer = faiss.IndexFlatIP(dim)
    index: faiss.IndexIVF
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, _SQ_TYPES[kind], faiss.METRIC_INNER_PRODUCT, False
        )
    index.cp.seed = params.seed
    index.cp.max_points_per_centroid = params.train_points_per_list
    index.nprobe = params.nprobe  # the Python wrapper keeps `quantizer` alive as long as `index`
    return index


def kind_of(index: faiss.Index) -> IndexKind:
    """The kind of an index this module made (ValueError for any other index)."""
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        kind = _KIND_OF_SQ.get(int(index.sq.qtype))
        if kind is None or index.by_residual:
            raise ValueError(
                f"unsupported scalar quantiser (type {index.sq.qtype}, residual {index.by_residual})"
            )
        return kind  # type: ignore[return-value]
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf_flat"
    raise ValueError(f"unsupported IVF index {type(index).__name__}")


def label(index: faiss.IndexIVF) -> str:
    """``ivf{nlist}`` plus the codec: ``ivf4096``, ``ivf4096-sq8``, ``ivf4096-fp16``."""
    return f"ivf{index.nlist}{_SUFFIX[kind_of(index)]}"


def train(index: faiss.IndexIVF, sample: np.ndarray, codec_of: faiss.IndexIVF | None = None) -> None:
    """Train the coarse quantiser (and the codec) on ``sample`` (n, dim) float32. With ``codec_of``, an
    index of the same kind, its codec is kept: codes of one stay valid in the other."""
    index.train(sample)
    if isinstance(codec_of, faiss.IndexIVFScalarQuantizer) and isinstance(
        index, faiss.IndexIVFScalarQuantizer
    ):
        faiss.copy_array_to_vector(faiss.vector_to_array(codec_of.sq.trained), index.sq.trained)


def encode(index: faiss.IndexIVF, x: np.ndarray) -> np.ndarray:
    """(n, code_size) uint8 codes of (n, dim) float32 vectors."""
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        codes: np.ndarray = index.sq.compute_codes(x)
        return codes
    return np.ascontiguousarray(x, np.float32).view(np.uint8).reshape(x.shape[0], -1)


def decode(index: faiss.IndexIVF, codes: np.ndarray) -> np.ndarray:
    """(n, dim) float32 vectors of (n, code_size) codes."""
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        out: np.ndarray = index.sq.decode(codes)
        return out
    return np.ascontiguousarray(codes).view(np.float32).reshape(codes.shape[0], -1)


def assign(index: faiss.IndexIVF, x: np.ndarray) -> np.ndarray:
    """(n,) int32: the list of each vector (its nearest centroid)."""
    out: np.ndarray = index.quantizer.assign(x, 1)[:, 0].astype(np.int32)
    return out


def _lists(index: faiss.IndexIVF) -> faiss.InvertedLists:
    invlists = index.invlists
    assert invlists is not None, "an IVF index always has inverted lists"
    return invlists


def add_codes(index: faiss.IndexIVF, ids: np.ndarray, codes: np.ndarray, lists: np.ndarray) -> None:
    """Append (ids (n,) int64, codes (n, code_size) uint8) to their ``lists`` (n,), one call per list."""
    if not ids.size:
        return
    order = np.argsort(lists, kind="stable")
    lists, ids = lists[order], np.ascontiguousarray(ids[order], np.int64)
    codes = np.ascontiguousarray(codes[order])
    bounds = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
    invlists = _lists(index)
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        invlists.add_entries(int(lists[s]), e - s, faiss.swig_ptr(ids[s:e]), faiss.swig_ptr(codes[s:e]))
    index.ntotal += int(ids.size)


def add(index: faiss.IndexIVF, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Encode and add vectors (n, dim) under ``ids``; returns the list of each (n,) int32."""
    lists = np.zeros(ids.size, np.int32)
    for s in range(0, ids.size, CHUNK):
        part = np.ascontiguousarray(x[s : s + CHUNK], np.float32)
        lists[s : s + CHUNK] = assign(index, part)
        add_codes(index, ids[s : s + CHUNK], encode(index, part), lists[s : s + CHUNK])
    return lists


def _views(index: faiss.IndexIVF, list_no: int) -> tuple[np.ndarray, np.ndarray]:
    """Writable views of one list's ids (m,) and codes (m, code_size), valid until it changes size."""
    invlists = _lists(index)
    size = invlists.list_size(list_no)
    if not size:
        return np.zeros(0, np.int64), np.zeros((0, index.code_size), np.uint8)
    ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
    codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * index.code_size)
    return ids, codes.reshape(size, index.code_size)


def remove(index: faiss.IndexIVF, ids: np.ndarray, lists: np.ndarray) -> int:
    """Remove ``ids`` (n,) held in ``lists`` (n,): each list concerned is compacted in place (its order
    kept). Returns how many were found."""
    removed = 0
    order = np.argsort(lists, kind="stable")
    lists, ids = lists[order], ids[order]
    bounds = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        list_no = int(lists[s])
        held, codes = _views(index, list_no)
        keep = ~np.isin(held, ids[s:e])
        kept = int(keep.sum())
        held[:kept], codes[:kept] = held[keep], codes[keep]  # the right sides are copies
        _lists(index).resize(list_no, kept)
        removed += held.size - kept
    index.ntotal -= removed
    return removed


def entries(
    index: faiss.IndexIVF, fraction: float = 1.0, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Copies of (ids, codes) of every list in turn, about ``CHUNK`` vectors at a time; with
    ``fraction`` < 1 a random share of each list (a training sample)."""
    rng = np.random.default_rng(seed)
    ids_parts: list[np.ndarray] = []
    code_parts: list[np.ndarray] = []
    pending = 0
    for list_no in range(index.nlist):
        held, codes = _views(index, list_no)
        if fraction < 1.0 and held.size:
            pick = np.flatnonzero(rng.random(held.size) < fraction)
            held, codes = held[pick], codes[pick]
        if held.size:
            ids_parts.append(held.copy())
            code_parts.append(codes.copy())
            pending += held.size
        if pending >= CHUNK:
            yield np.concatenate(ids_parts), np.concatenate(code_parts)
            ids_parts, code_parts, pending = [], [], 0
    if pending:
        yield np.concatenate(ids_parts), np.concatenate(code_parts)


def list_numbers(index: faiss.IndexIVF) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lists) of every vector held: which list holds each id (to rebuild the ``lists`` column)."""
    ids = [_views(index, list_no)[0].copy() for list_no in range(index.nlist)]
    lists = [np.full(part.size, list_no, np.int32) for list_no, part in enumerate(ids)]
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(ids), np.concatenate(lists)


def reconstruct(index: faiss.IndexIVF, ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Decoded vectors (n, dim) of ``ids`` held in ``lists``; KeyError for an id not in its list."""
    out = np.zeros((ids.size, index.d), np.float32)
    for list_no in np.unique(lists).tolist():
        rows = np.flatnonzero(lists == list_no)
        held, codes = _views(index, list_no)
        if not held.size:
            raise KeyError(f"ids not found in list {list_no}")
        order = np.argsort(held)
        pos = order[np.minimum(np.searchsorted(held, ids[rows], sorter=order), held.size - 1)]
        if (held[pos] != ids[rows]).any():
            raise KeyError(f"ids not found in list {list_no}")
        out[rows] = decode(index, codes[pos])
    return out


def drop_direct_map(index: faiss.IndexIVF) -> None:
    """Free a direct map (snapshots written before the lists column kept one): nothing reads it."""
    index.set_direct_map_type(faiss.DirectMap.NoMap)  # type: ignore[attr-defined]


def release_freed_memory() -> None:
    """Hand the heap pages freed by a rebuild (the old index's lists: many small blocks, which the C
    allocator otherwise keeps) back to the system; glibc only, a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("malloc_trim is not available here")
