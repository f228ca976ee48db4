"""Adaptive retrieval depth (RAMRec's AKR; METHODS §3): behavioural diversity sets K per user.

With the user's memory matrix M (n × D, the embeddings of the distinct items of their recent history):
``S = M Mᵀ``; a softmax over the n(n−1) off-diagonal entries; its entropy H normalised by ln(n(n−1))
(Ĥ = 0.5 when n < 2); ``K = int(K_base · (0.5 + Ĥ) · min(1, sqrt(n / 100)))`` clipped to
[k_min, k_max] and to n. Diverse users retrieve more, focused users fewer, new users few.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.data import IntArray


@dataclass
class AdaptiveKConfig:
    k_base: int = 20
    k_min: int = 3
    k_max: int = 20
    capacity: int = 75  # most recent distinct items that make up the user's memory


def normalised_entropy(memory: Tensor, mask: Tensor) -> Tensor:
    """memory (B, C, D), mask (B, C) True for real rows → Ĥ (B,) in [0, 1]; 0.5 where n < 2."""
    n = mask.sum(dim=1)  # (B,)
    sim = memory @ memory.transpose(1, 2)  # (B, C, C)
    C = memory.shape[1]
    pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(C, dtype=torch.bool, device=memory.device)
    logits = sim.masked_fill(~pair, -math.inf).flatten(1)  # (B, C·C), softmax over off-diagonal pairs
    p = torch.softmax(logits, dim=1)
    log_p = torch.log_softmax(logits, dim=1)
    h = -(torch.where(p > 0, p * log_p, 0.0)).sum(dim=1)
    pairs = (n * (n - 1)).clamp(min=2).to(h.dtype)
    h_norm = h / torch.log(pairs)
    return torch.where(n >= 2, h_norm.clamp(0.0, 1.0), torch.full_like(h_norm, 0.5))


def k_from_entropy(h_norm: Tensor, n: Tensor, cfg: AdaptiveKConfig) -> Tensor:
    """Ĥ (B,), n (B,) → K (B,) int64."""
    scale = torch.clamp(torch.sqrt(n.to(h_norm.dtype) / 100.0), max=1.0)
    k = (cfg.k_base * (0.5 + h_norm) * scale).floor().long()
    k = k.clamp(cfg.k_min, cfg.k_max)
    return torch.minimum(k, n.long().clamp(min=1))


def recent_distinct(history: IntArray, capacity: int) -> IntArray:
    """The last ``capacity`` distinct items of a history, most recent last."""
    _, first_from_end = np.unique(history[::-1], return_index=True)
    keep = np.sort(len(history) - 1 - first_from_end)[-capacity:]
    out: IntArray = history[keep]
    return out


def adaptive_k(
    item_emb: Tensor, histories: list[IntArray], cfg: AdaptiveKConfig, batch_size: int = 2048
) -> IntArray:
    """K for each history (ids ≥ 1, oldest first) from the item embedding table (N+1, D)."""
    out = np.zeros(len(histories), dtype=np.int64)
    with torch.no_grad():
        for s in range(0, len(histories), batch_size):
            rows = [recent_distinct(h, cfg.capacity) for h in histories[s : s + batch_size]]
            width = max(1, max(len(r) for r in rows))
            ids = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = r
            ids_t = torch.from_numpy(ids).to(item_emb.device)
            mask = ids_t > 0
            h_norm = normalised_entropy(item_emb[ids_t], mask)
            out[s : s + len(rows)] = k_from_entropy(h_norm, mask.sum(dim=1), cfg).cpu().numpy()
    return out
