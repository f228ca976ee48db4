"""What retrieval costs a trained model: the memory bank and, per 1,000 queries, encode / retrieve / fuse.

    python -m bench.retrieval_cost --model runs/retrieval/beauty/pretrain-raserec_k20-seed0

Measured on a model directory through the predictor and the offline scoring path (model.offline), on
one CPU thread: building the test-time bank (encode every training and validation prefix, index the
keys), its size, and for the first ``--queries`` test queries the encoder pass, the retrieval (the
queries' adaptive K, the selection rules and the vote's own search included; a control's draw for a
control model, bench.controls) and the fusion. The ranking over the whole catalogue, which every model
pays, and the vote's and the transition channel's mixing are left out. `bench.retrieval` records it
for every fine-tuned variant (``cost`` in its result files).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import torch

from bench.controls import retrieval_of
from model import artifact, offline
from model.data import IntArray, Samples, Split, leave_one_out, load_dataset
from model.finetune import FinetuneConfig, build_bank
from model.memory import MemoryBank, encode_samples
from model.predictor import Predictor, from_artifact
from model.user_memory import build_table

QUERIES = 2_000  # test queries timed
FUSE_BATCH = 256


@contextmanager
def one_thread() -> Iterator[None]:
    """torch and FAISS on one thread for the measurement, their settings restored after."""
    torch_n, faiss_n = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_n)
        faiss.omp_set_num_threads(faiss_n)


def tested_bank(predictor: Predictor, split: Split, device: str) -> MemoryBank:
    """The bank a model is tested with: the training pairs, then the validation pairs."""
    train, _ = build_bank(predictor.encoder, split.train, device)
    return train.concat(build_bank(predictor.encoder, split.valid, device)[0])


def bank_mb(bank: MemoryBank) -> float:
    """The bank's keys (raw and unit), next items, users and prefix lengths in MiB: the figure recorded
    since the first runs (the prefix items the transition channel reads are left out)."""
    arrays = (bank.keys, bank.unit_keys, bank.items, bank.users, bank.prefix_lens)
    return sum(a.nbytes for a in arrays) / 2**20


def user_items(
    predictor: Predictor, art: artifact.Artifact, split: Split, samples: Samples, device: str
) -> IntArray | None:
    """The queries' own user memories when the model fuses them (RAMRec), else None."""
    if not predictor.cfg.user_memories:
        return None
    from service.memory_rules import store_rules  # the store's rules, as `memrec train` replays them

    cfg = FinetuneConfig.from_json(art.finetune_config).user_memory()
    return build_table(art.encoder, split, cfg, store_rules(), device).lookup(samples)


def measure(art: artifact.Artifact, split: Split, n_queries: int = QUERIES) -> dict[str, float]:
    """The retrieval cost of a loaded model directory on its dataset's ``split``, on the CPU."""
    device = "cpu"
    predictor = from_artifact(art)
    if not predictor.retrieval:
        raise ValueError(f"model {art.model_version} retrieves no memories (no fusion module or k = 0)")
    retrieve = retrieval_of(art)
    t0 = time.perf_counter()
    bank = tested_bank(predictor, split, device)
    build_s = time.perf_counter() - t0
    samples = split.test.subset(np.arange(min(n_queries, len(split.test))))
    mine = user_items(predictor, art, split, samples, device)  # replayed outside the timings
    t0 = time.perf_counter()
    states = encode_samples(predictor.encoder, samples, device)
    t1 = time.perf_counter()
    queries = offline.prepare(
        predictor, bank, samples, device, states=states, user_items=mine, retrieve=retrieve
    )
    t2 = time.perf_counter()
    fuse(predictor, queries)
    t3 = time.perf_counter()
    per_1k = 1000.0 / len(samples)
    return {
        "bank_memories": float(len(bank)),
        "bank_build_seconds": build_s,
        "bank_mb": bank_mb(bank),
        "encode_ms_per_1k": (t1 - t0) * 1000 * per_1k,
        "retrieve_ms_per_1k": (t2 - t1) * 1000 * per_1k,
        "fuse_ms_per_1k": (t3 - t2) * 1000 * per_1k,
    }


@torch.inference_mode()
def fuse(predictor: Predictor, queries: offline.Queries) -> None:
    """The fused states of every query, in batches: the predictor's selection and fusion module."""
    for s in range(0, queries.plan.rows, FUSE_BATCH):
        q = queries.batch(np.arange(s, min(s + FUSE_BATCH, queries.plan.rows)))
        mem = predictor.memories(q.plan, q.hits) if q.hits is not None else None
        predictor.fused(torch.from_numpy(q.plan.states), mem, q.user_items)


def measure_dir(
    model_dir: Path, dataset: str | None = None, data_dir: str | None = None, n_queries: int = QUERIES
) -> dict[str, float]:
    """:func:`measure` on a model directory, its dataset (or ``dataset``) split as in training, one thread."""
    art = artifact.load(model_dir)
    data = load_dataset(dataset or art.dataset, data_dir).with_vocab(art.vocab)
    split = leave_one_out(data, art.encoder.cfg.max_len)
    with one_thread():
        return measure(art, split, n_queries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model directory written by `memrec train`")
    p.add_argument("--dataset", help="the dataset (default: the model's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--queries", type=int, default=QUERIES, help="test queries timed")
    args = p.parse_args(argv)
    cost = measure_dir(args.model, args.dataset, args.data_dir, args.queries)
    print(json.dumps(cost, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
