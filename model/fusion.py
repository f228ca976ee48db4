"""Retrieval-augmented fusion: refine the encoder state h with retrieved memories.

The published module is RaSeRec's Retrieval-Augmented Module (RAM, Zhao et al. 2024; METHODS §2):
two channels of 2-hop cross-attention over the K retrieved memories (keys = memory states, values =
embeddings of the memories' next items)::

    seq→tar:  h_s = XAttn(FFN(XAttn(h, Keys, Values)), Keys, Values)
    tar→seq:  h_t = XAttn(FFN(XAttn(h, Values, Keys)), Values, Keys)
    ĥ = α·h + (1−α)·(β·h_s + (1−β)·h_t)

Our switchable changes, each off by default until a benchmark shows it helps:

* ``residual_norm``: a residual connection and LayerNorm around every cross-attention (the original has
  neither, so a hop can wash out the query).
* ``gate``: RAMRec's learned sigmoid gate, capped, replaces the fixed α:
  ``g = cap · σ(w·[h; r] + b)``, ``ĥ = (1−g)·h + g·r`` with r the mixed channels; trained here, unlike
  the original where it never was.
* ``similarity_bias``: similarity-aware attention: a learned multiple of each memory's cosine similarity
  to the query is added to the attention logits, so the retriever's ranking informs the attention.
* ``user_memories``: the user's own memories (RAMRec; ``model.user_memory``) join the retrieved ones as
  extra slots (key = the unit item embedding, value = the embedding); a learned type vector added to
  their keys lets attention tell the two kinds apart.

Empty memory slots (fewer survivors than K) are masked; a query with no memory at all keeps ĥ = h.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model.sasrec import FeedForward


@dataclass
class FusionConfig:
    dim: int = 64
    n_heads: int = 2
    inner_dim: int = 256
    dropout: float = 0.5
    attn_temperature: float = 1.0
    alpha: float = 0.5  # weight of h itself in the published mix
    beta: float = 1.0  # weight of the seq→tar channel (published: 1, tar→seq unused)
    residual_norm: bool = False
    gate: bool = False
    gate_cap: float = 0.3
    similarity_bias: bool = False
    user_memories: bool = False
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CrossAttention(nn.Module):
    """Multi-head attention of one query per row over K memories, with output projection and dropout."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.temperature = cfg.attn_temperature
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps) if cfg.residual_norm else None
        self.sim_weight = nn.Parameter(torch.zeros(1)) if cfg.similarity_bias else None

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor, sims: Tensor) -> Tensor:
        # query (B, D); keys, values (B, K, D); mask (B, K) True = memory present; sims (B, K)
        B, K, D = keys.shape
        H, d = self.n_heads, D // self.n_heads
        q = self.q(query).view(B, H, 1, d)
        k = self.k(keys).view(B, K, H, d).transpose(1, 2)  # (B, H, K, d)
        v = self.v(values).view(B, K, H, d).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / (math.sqrt(d) * self.temperature)  # (B, H, 1, K)
        if self.sim_weight is not None:
            logits = logits + self.sim_weight * torch.where(mask, sims, 0.0)[:, None, None, :]
        logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
        attn = self.attn_dropout(torch.softmax(logits, dim=-1))
        out: Tensor = self.dropout(self.proj((attn @ v).reshape(B, D)))  # (B, D)
        if self.norm is not None:
            out = self.norm(query + out)
        return out


class Channel(nn.Module):
    """XAttn → FFN → XAttn with the same keys and values: one RAM channel."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.attn1 = CrossAttention(cfg)
        self.ffn = FeedForward(cfg.dim, cfg.inner_dim, cfg.dropout, cfg.layer_norm_eps)
        self.attn2 = CrossAttention(cfg)

    def forward(self, h: Tensor, keys: Tensor, values: Tensor, mask: Tensor, sims: Tensor) -> Tensor:
        x = self.ffn(self.attn1(h, keys, values, mask, sims))
        out: Tensor = self.attn2(x, keys, values, mask, sims)
        return out


class RetrievalFusion(nn.Module):
    """(h, retrieved memories) → refined state ĥ, (B, D)."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.seq_tar = Channel(cfg)
        self.tar_seq = Channel(cfg) if cfg.beta < 1.0 else None
        self.gate = nn.Linear(2 * cfg.dim, 1) if cfg.gate else None
        self.user_type = nn.Parameter(torch.zeros(cfg.dim)) if cfg.user_memories else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        h: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor,
        sims: Tensor,
        user_slots: Tensor | None = None,
    ) -> Tensor:
        """h (B, D); keys (B, K, D) memory states; values (B, K, D) next-item embeddings;
        mask (B, K) True where a memory is present; sims (B, K) cosine similarity to the query;
        user_slots (B, K) True at the user's own memories (only with ``user_memories``)."""
        if self.user_type is not None and user_slots is not None:
            keys = keys + user_slots[..., None].to(keys.dtype) * self.user_type
        has_memory = mask.any(dim=1)  # (B,)
        safe_mask = mask | ~has_memory[:, None]  # rows with no memory attend to zeros, result discarded
        r = self.seq_tar(h, keys, values, safe_mask, sims)
        if self.tar_seq is not None:
            r_t = self.tar_seq(h, values, keys, safe_mask, sims)
            r = self.cfg.beta * r + (1 - self.cfg.beta) * r_t
        if self.gate is not None:
            g = self.cfg.gate_cap * torch.sigmoid(self.gate(torch.cat([h, r], dim=-1)))  # (B, 1)
            fused = (1 - g) * h + g * r
        else:
            fused = self.cfg.alpha * h + (1 - self.cfg.alpha) * r
        return torch.where(has_memory[:, None], fused, h)
