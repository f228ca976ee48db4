"""Frozen TorchScript graphs of the encoder and the fusion module, for the request path.

A request batch is small (a few rows of ≤ 50 items), so each forward pass costs its ~40 operator calls
far more than their arithmetic. The predictor therefore serves the encoder and the fusion module as
frozen TorchScript graphs (:func:`freeze`): the same operators without the Python of ``nn.Module``
calls. A graph is kept only if it gives exactly the eager module's numbers on probe batches, so the
service still ranks exactly as the offline evaluator does; otherwise the eager module serves.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]

from model.sasrec import SASRec

log = logging.getLogger(__name__)

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


def encoder_inputs(n_items: int, rows: int, length: int, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (rows, length), generator=g)
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    return items * (torch.arange(length) < lengths[:, None]), lengths  # right-padded


def fusion_inputs(dim: int, rows: int, k: int, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(rows, k, dim, generator=g), dim=-1)
    present = torch.rand(rows, k, generator=g) < 0.8
    if rows > 1:
        present[0] = False  # a row without any memory beside rows with some
    sims = torch.rand(rows, k, generator=g)
    return torch.randn(rows, dim, generator=g), keys, torch.randn(rows, k, dim, generator=g), present, sims


Encode = Callable[[Tensor, Tensor], Tensor]  # items (B, T) right-padded, lengths (B,) → states (B, D)


def frozen_encoder(encoder: SASRec) -> Encode | None:
    """The encoder's frozen graph, probed on batches of other shapes than its example's."""
    n, longest = encoder.cfg.n_items, encoder.cfg.max_len
    probes = [encoder_inputs(n, b, t, seed) for seed, (b, t) in enumerate([(1, 1), (5, 17), (16, longest)])]
    return freeze(_Encode(encoder), encoder_inputs(n, 3, 7, 99), probes, "encoder")


def frozen_fusion(fusion: nn.Module, dim: int, k: int) -> Callable[..., Tensor] | None:
    """The fusion module's frozen graph for K = ``k`` memories per query (fewer on a probe, so a K baked
    into the trace shows)."""
    probes = [fusion_inputs(dim, b, kk, seed) for seed, (b, kk) in enumerate([(1, k), (9, k), (4, 3)])]
    return freeze(fusion, fusion_inputs(dim, 3, k, 99), probes, "fusion module")
