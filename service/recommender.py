"""The model half of the request path, pure of HTTP and of the store: encode histories, choose K, fuse
retrieved memories, rank the whole catalogue. Arrays in, arrays out; every call runs under
``torch.inference_mode`` and is safe to run in a worker thread.

A request batch is small (a few rows of ≤ 50 items), so each forward pass costs its ~40 operator calls
far more than their arithmetic. The encoder and the fusion module are therefore served as frozen
TorchScript graphs (:func:`freeze`): the same operators without the Python of ``nn.Module`` calls. A
graph is kept only if it gives exactly the eager module's numbers on probe batches, so the service
still ranks exactly as the offline evaluator does; otherwise the eager module serves.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]

from memory_store.transitions import RECENT
from model import transitions as tr
from model.adaptive import adaptive_k
from model.artifact import Artifact, ArtifactError
from model.finetune import FinetuneConfig
from model.fusion import RetrievalFusion
from model.sasrec import SASRec
from model.transitions import TransitionMix
from model.vote import Vote, mix

log = logging.getLogger(__name__)

IntArray = np.ndarray
ENCODE_CHUNK = 16  # rows per encoder pass (see Recommender.encode)
Inputs = tuple[Tensor, ...]


class _Encode(nn.Module):
    """``SASRec.encode`` as a module's forward, so it can be traced."""

    def __init__(self, encoder: SASRec) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, items: Tensor, lengths: Tensor) -> Tensor:
        out: Tensor = self.encoder.encode(items, lengths)
        return out


def freeze(
    module: nn.Module, example: Inputs, probes: Sequence[Inputs], name: str
) -> Callable[..., Tensor] | None:
    """A frozen TorchScript graph of ``module`` (eval mode) traced on ``example``, or None when tracing
    fails or the graph's output differs from the module's on any of ``probes`` (other shapes than the
    example's, so a shape baked into the trace shows).

    TorchScript's optimising executor is switched off for the whole process: it re-specialises a graph
    for every new input shape, a stall of tens of milliseconds each time, and request shapes vary all
    the time. Process-wide, because the switch is one global flag: toggling it around each call races
    between the event-loop thread and a worker thread encoding a large /interactions batch."""
    module = module.eval()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", TracerWarning)  # asserts and Python scalars
            # TorchScript is deprecated from torch 2.13 on (we pin 2.13); should a later torch drop it,
            # tracing fails here and the eager module serves.
            warnings.filterwarnings("ignore", "`torch\\.jit\\.", DeprecationWarning)
            traced = torch.jit.trace(module, example, check_trace=False)  # type: ignore[no-untyped-call]
            torch._C._set_graph_executor_optimize(True)  # freezing itself needs the optimising passes
            graph = torch.jit.freeze(traced)
            torch._C._set_graph_executor_optimize(False)
            exact = all(torch.equal(graph(*p), module(*p)) for p in probes)
    except Exception as exc:  # any failure to trace or run the graph: the eager module is always right
        log.warning("serving the eager %s: tracing failed (%s)", name, exc)
        return None
    if not exact:
        log.warning("serving the eager %s: its frozen graph does not reproduce it exactly", name)
        return None
    call: Callable[..., Tensor] = graph
    return call


def _encoder_inputs(n_items: int, rows: int, length: int, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (rows, length), generator=g)
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    return items * (torch.arange(length) < lengths[:, None]), lengths  # right-padded


def _fusion_inputs(dim: int, rows: int, k: int, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(rows, k, dim, generator=g), dim=-1)
    present = torch.rand(rows, k, generator=g) < 0.8
    if rows > 1:
        present[0] = False  # a row without any memory beside rows with some
    sims = torch.rand(rows, k, generator=g)
    return torch.randn(rows, dim, generator=g), keys, torch.randn(rows, k, dim, generator=g), present, sims


class Recommender:
    """Encoder (+ fusion when the artifact has one) of one loaded artifact."""

    def __init__(self, art: Artifact, frozen: bool = True) -> None:
        self.encoder: SASRec = art.encoder.eval()
        self.fusion: RetrievalFusion | None = art.fusion.eval() if art.fusion is not None else None
        self.cfg = FinetuneConfig(**art.finetune_config) if self.fusion is not None else None
        if self.cfg is not None and self.cfg.user_memories:
            # Serving it without them would answer with a model other than the one evaluated.
            raise ArtifactError(
                f"model {art.model_version} fuses per-user memories (fine-tune flag --user-memories), "
                "which the service does not read yet; serve a model trained without that flag"
            )
        if self.cfg is not None and self.cfg.retrieval != "similarity":
            raise ArtifactError(
                f"model {art.model_version} was fine-tuned with --retrieval {self.cfg.retrieval}, a "
                "benchmark control; serve a model trained with similarity retrieval"
            )
        self.vote = self.cfg.vote() if self.cfg is not None else Vote()
        self.transitions = self.cfg.transitions() if self.cfg is not None else TransitionMix()
        if self.transitions.order > RECENT:  # the store keeps RECENT items of each memory's prefix
            raise ArtifactError(
                f"model {art.model_version} reads {self.transitions.order} items per transition, the "
                f"memory store keeps {RECENT}"
            )
        if self.transitions.on and (art.bank is None or art.bank.recent is None):
            raise ArtifactError(
                f"model {art.model_version} mixes item transitions, but its memory bank has no prefix items"
            )
        self.max_len = self.encoder.cfg.max_len
        self.n_items = self.encoder.cfg.n_items
        self.popular = _popularity(art)
        self._encode: Callable[[Tensor, Tensor], Tensor] = self.encoder.encode
        self._fuse: Callable[..., Tensor] | None = self.fusion
        self.frozen = False
        if frozen:
            self._freeze()

    def _freeze(self) -> None:
        """Swap in frozen graphs of the encoder and the fusion module where they are exact."""
        n, dim, longest = self.n_items, self.encoder.cfg.dim, self.max_len
        probes = [
            _encoder_inputs(n, b, t, seed) for seed, (b, t) in enumerate([(1, 1), (5, 17), (16, longest)])
        ]
        encode = freeze(_Encode(self.encoder), _encoder_inputs(n, 3, 7, 99), probes, "encoder")
        if encode is not None:
            self._encode = encode
        if self.fusion is not None and self.k_max > 0:
            k = self.k_max
            fprobes = [
                _fusion_inputs(dim, b, kk, seed) for seed, (b, kk) in enumerate([(1, k), (9, k), (4, 3)])
            ]
            fuse = freeze(self.fusion, _fusion_inputs(dim, 3, k, 99), fprobes, "fusion module")
            if fuse is not None:
                self._fuse = fuse
        self.frozen = encode is not None and (self.fusion is None or self._fuse is not self.fusion)

    @property
    def retrieval(self) -> bool:
        return self.fusion is not None

    @property
    def k_max(self) -> int:
        return self.cfg.k if self.cfg is not None else 0

    @property
    def cross_user(self) -> bool:
        """Fine-tuned on other users' memories only (--cross-user): a user's own are dropped."""
        return self.cfg is not None and self.cfg.cross_user

    @property
    def depth(self) -> int:
        """Memories a query uses: the fusion's k, or more when more vote (model.vote)."""
        return max(self.k_max, self.vote.depth if self.vote.on else 0)

    @property
    def fetch(self) -> int:
        """Memories to fetch per query so that ``depth`` survive dropping the user's own, as offline."""
        assert self.cfg is not None
        return max(self.depth * self.cfg.fetch_factor, self.depth) if self.cross_user else self.depth

    @torch.inference_mode()
    def encode(self, histories: list[list[int]]) -> np.ndarray:
        """Non-empty histories (item ids ≥ 1, oldest first) → states (B, D) float32 of their last 50 items.

        Encoded in length-sorted chunks of at most ``ENCODE_CHUNK`` rows: one padded (B, T) pass costs
        as if every row were the longest, and attention grows with T². On Beauty histories a batch of 42
        took 9.0 ms in one pass and 3.9 ms in chunks of 16.
        """
        rows = [h[-self.max_len :] for h in histories]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(rows), self.encoder.cfg.dim), dtype=np.float32)
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = order[start : start + ENCODE_CHUNK]
            items = np.zeros((len(chunk), int(lengths[chunk].max())), dtype=np.int64)  # (b, T) right-padded
            for j, i in enumerate(chunk):
                items[j, : lengths[i]] = rows[i]
            h = self._encode(torch.from_numpy(items), torch.from_numpy(lengths[chunk]))
            out[chunk] = h.float().numpy()
        return out

    @torch.inference_mode()
    def depths(self, histories: list[list[int]]) -> IntArray:
        """K per request: RAMRec's entropy rule when the model was fine-tuned with it, else k."""
        assert self.cfg is not None
        adaptive = self.cfg.adaptive()
        if adaptive is None:
            return np.full(len(histories), self.cfg.k, dtype=np.int64)
        rows = [np.asarray(h[-self.max_len :], dtype=np.int64) for h in histories]
        out: IntArray = adaptive_k(self.encoder.item_emb.weight, rows, adaptive)
        return out

    def encode_with_depths(self, histories: list[list[int]]) -> tuple[np.ndarray, IntArray]:
        """:meth:`encode` and :meth:`depths` of the same histories."""
        depths = self.depths(histories) if self.retrieval else np.zeros(len(histories), dtype=np.int64)
        return self.encode(histories), depths

    @torch.inference_mode()
    def fuse(self, states: np.ndarray, keys: np.ndarray, items: np.ndarray, sims: np.ndarray) -> Tensor:
        """states (B, D), keys (B, K, D) unit, items (B, K) (0 = empty slot), sims (B, K) → ĥ (B, D)."""
        h = torch.from_numpy(states)
        if self._fuse is None or keys.shape[1] == 0:
            return h
        present = torch.from_numpy(items > 0)  # (B, K)
        values = self.encoder.item_emb(torch.from_numpy(items))  # padding row for empty slots
        sims_t = torch.from_numpy(np.where(items > 0, sims, 0.0).astype(np.float32))
        fused: Tensor = self._fuse(h, torch.from_numpy(keys), values, present, sims_t)
        return fused

    @torch.inference_mode()
    def rank(
        self,
        h: Tensor,
        masks: list[IntArray],
        n: list[int],
        voters: tuple[np.ndarray, np.ndarray] | None = None,
        shares: tr.Shares | None = None,
    ) -> list[tuple[IntArray, np.ndarray]]:
        """Scores over the catalogue, masked items removed, top n[i] per row: (item ids, scores).
        ``voters``: the nearest memories' next items (B, V), 0 = empty slot, and their similarities
        (B, V); with the model's vote on they are mixed into the scores, which become log-probabilities.
        ``shares``: the transition channel's (:meth:`shares`), mixed in after the vote."""
        scores = self.encoder.scores(h)  # (B, n_items + 1), column 0 = -inf
        if voters is not None and self.vote.on:
            items, sims = voters  # empty slots (item 0) are masked inside the mix, whatever their sims
            scores = mix(scores, torch.from_numpy(items), torch.from_numpy(sims), self.vote)
        if shares is not None:
            scores = tr.mix(scores, shares, self.transitions)
        if any(m.size for m in masks):  # one indexed write for the batch, not one per row
            rows = torch.from_numpy(np.repeat(np.arange(len(masks)), [m.size for m in masks]))
            scores[rows, torch.from_numpy(np.concatenate(masks).astype(np.int64))] = -torch.inf
        top_s, top_i = torch.topk(scores, k=min(max(n), self.n_items), dim=1)
        out = []
        for i, want in enumerate(n):
            s, ids = top_s[i, :want].numpy(), top_i[i, :want].numpy()
            keep = np.isfinite(s)
            out.append((ids[keep].astype(np.int64), s[keep].astype(np.float64)))
        return out

    def shares(self, recent: IntArray, rows: dict[int, tr.Row]) -> tr.Shares:
        """The transition shares of queries whose last items are ``recent`` (B, order),
        most recent first, from the store's follower rows of those items."""
        return tr.shares_from_rows(recent, rows, self.n_items + 1, self.transitions.order)

    def cold_start(self, mask: IntArray, n: int) -> tuple[IntArray, np.ndarray]:
        """The most frequent targets of the training memories (a popularity list), masked items removed."""
        order = self.popular[~np.isin(self.popular, mask)][:n]
        return order, np.zeros(len(order), dtype=np.float64)


def _popularity(art: Artifact) -> IntArray:
    """Item ids by how often they are a training target (the bank), ties by id; all items as fallback."""
    n_items = art.encoder.cfg.n_items
    counts = np.zeros(n_items + 1, dtype=np.int64)
    if art.bank is not None:
        np.add.at(counts, art.bank.items, 1)
    order: IntArray = np.argsort(-counts[1:], kind="stable") + 1
    return order
