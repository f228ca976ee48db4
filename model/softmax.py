"""Full-softmax cross-entropy over the whole catalogue, built in row chunks, gradient in the same pass.

Training scores every target against every item: logits (M, N) for M targets and N items. Built whole,
as ``F.cross_entropy(h @ Eᵀ, y)`` does, that tensor is M × N floats (a Beauty all-position batch: 12.8k
targets × 12k items, 600 MB), and every pass over it (the matmul's output, the softmax, its backward,
the two gradient matmuls) streams it from main memory. Here it is built ``chunk`` rows at a time and
each chunk's gradient is taken at once, so a chunk stays in the cache and nothing of size M × N is kept
for the backward pass::

    for each chunk r of rows:   L = h_r Eᵀ                         (r, N)
                                loss_r = logsumexp(L) − L[y_r]
                                G = (softmax(L) − onehot(y_r)) / M  (the mean over all M rows)
                                ∂h_r = G E,   ∂E += Gᵀ h_r

The gradients are computed in the forward pass and scaled by the incoming gradient in the backward
pass: the loss is a scalar, so that is exact. Measured on one core (2,048 targets × 18,358 items,
D = 64): 483 ms for the forward and backward of the whole-tensor version, 182 ms here, with the same
loss and gradients to 1e-9 (the sums run in another order).

Column 0 of the table is the padding id, never a target: it is left out, as the ``-inf`` column of
``SASRec.scores`` leaves it out of the softmax, and its gradient is zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

CHUNK_ROWS = 64  # (64, N) float32 logits: 3 MB for Beauty's 12k items, 4.7 MB for Sports' 18k


def full_softmax_ce(h: Tensor, table: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of ``h @ table[1:]ᵀ`` against ``targets``: h (M, D) states, table (N + 1, D)
    with row 0 the padding id, targets (M,) ids in 1..N. Equal to
    ``F.cross_entropy(SASRec.scores(h), targets)``, with gradients for h and table where they need one.

    ``chunk`` rows of logits at a time: by default ``CHUNK_ROWS`` on the CPU, where the cache is what
    matters, and all M at once on an accelerator, whose memory bandwidth is not the limit and where many
    small kernels would be."""
    if chunk is None:
        chunk = CHUNK_ROWS if h.device.type == "cpu" else max(h.shape[0], 1)
    if h.dim() != 2 or table.dim() != 2 or h.shape[1] != table.shape[1]:
        shapes = f"{tuple(h.shape)} and {tuple(table.shape)}"
        raise ValueError(f"expected h (M, D) and table (N + 1, D), got {shapes}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"expected targets ({h.shape[0]},), got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    if torch.is_grad_enabled() and (h.requires_grad or table.requires_grad):
        loss: Tensor = _FullSoftmaxCE.apply(h, table, targets, chunk)  # type: ignore[no-untyped-call]
        return loss
    return _chunked(h, table, targets, chunk, want_h=False, want_table=False)[0]


class _FullSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, table: Tensor, targets: Tensor, chunk: int) -> Tensor:
        want_h, want_table = ctx.needs_input_grad[:2]
        loss, dh, dtable = _chunked(h, table, targets, chunk, want_h, want_table)
        ctx.save_for_backward(dh, dtable)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        dh, dtable = ctx.saved_tensors
        return (
            None if dh is None else dh * grad,
            None if dtable is None else dtable * grad,
            None,
            None,
        )


@torch.no_grad()
def _chunked(
    h: Tensor, table: Tensor, targets: Tensor, chunk: int, want_h: bool, want_table: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The loss (a 0-dim tensor) and, where asked for, its gradients for h (M, D) and table (N + 1, D)."""
    m = h.shape[0]
    items = table[1:]  # (N, D): the padding row never scores
    items_t = items.T.contiguous()  # (D, N): h_r @ items_t runs several times faster than h_r @ items.T
    y = targets - 1  # (M,) columns of items
    dh = torch.empty_like(h) if want_h else None
    dtable = torch.zeros_like(table) if want_table else None
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for s in range(0, m, chunk):
        h_r, y_r = h[s : s + chunk], y[s : s + chunk]
        logits = h_r @ items_t  # (r, N)
        target_logit = logits.gather(1, y_r[:, None])[:, 0]  # (r,)
        top = logits.amax(dim=1, keepdim=True)  # (r, 1): for a stable exp
        e = logits.sub_(top).exp_()  # (r, N), in place: no second (r, N) buffer
        norm = e.sum(dim=1, keepdim=True)  # (r, 1)
        total += (norm.log()[:, 0] + top[:, 0] - target_logit).sum(dtype=torch.float64)
        if dh is None and dtable is None:
            continue
        g = e.mul_(1.0 / (norm * m))  # (r, N): softmax / M
        g[torch.arange(len(y_r), device=h.device), y_r] -= 1.0 / m
        if dh is not None:
            dh[s : s + chunk] = g @ items
        if dtable is not None:
            dtable[1:].addmm_(g.T, h_r)
    return (total / m).to(h.dtype), dh, dtable
