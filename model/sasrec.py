"""The SASRec encoder (Kang & McAuley, ICDM 2018) as used by DuoRec, RaSeRec and RAMRec (METHODS §1).

Item embedding (id 0 = padding) + learned position embedding, LayerNorm, dropout, then post-LayerNorm
Transformer blocks with causal self-attention. Sequences are right-padded: position 0 is the oldest item
of the window, so trimming a batch to its longest sequence changes nothing. The representation of a
sequence is the output at its last real item. Scores over the catalogue reuse the input embedding table
(tied weights): ``scores = h · Eᵀ``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.softmax import full_softmax_ce


@dataclass
class EncoderConfig:
    n_items: int  # real items; the embedding table has n_items + 1 rows (row 0 = padding)
    max_len: int = 50
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_dim: int = 256
    dropout: float = 0.5  # hidden dropout (embeddings, attention output, feed-forward)
    attn_dropout: float = 0.5  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with output projection, dropout and a post-LN residual."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.n_heads:  # an explicit check, not an assert: `python -O` drops asserts
            raise ValueError(f"dim ({cfg.dim}) must be divisible by n_heads ({cfg.n_heads})")
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x: (B, T, D); mask: (B, 1, T, T) boolean, True where attention is allowed
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, D)
        out: Tensor = self.norm(x + self.dropout(self.proj(y)))
        return out


class FeedForward(nn.Module):
    """Position-wise D → inner → D GELU block with dropout and a post-LN residual."""

    def __init__(self, dim: int, inner_dim: int, dropout: float, eps: float = 1e-12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, inner_dim)
        self.fc2 = nn.Linear(inner_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))
        return out


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ffn = FeedForward(cfg.dim, cfg.inner_dim, cfg.dropout, cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out: Tensor = self.ffn(self.attn(x, mask))
        return out


class SASRec(nn.Module):
    """Sequence of item ids → one D-dim state per position; ``encode`` returns the last real one."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, items: Tensor) -> Tensor:
        """items: (B, T) right-padded ids, T ≤ max_len → states (B, T, D)."""
        x, mask = self.embed(items), self.causal_mask(items)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def embed(self, items: Tensor) -> Tensor:
        """items: (B, T) → the first block's input (B, T, D): item + position embeddings."""
        T = items.shape[1]
        # A shape, not a value: under torch.jit.trace it is checked once on the example input and
        # leaves nothing in the graph (callers of a traced encoder keep their inputs within max_len).
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.cfg.max_len}")
        pos = torch.arange(T, device=items.device)
        out: Tensor = self.dropout(self.norm(self.item_emb(items) + self.pos_emb(pos)))
        return out

    @staticmethod
    def causal_mask(items: Tensor) -> Tensor:
        """(B, 1, T, T) boolean: query t may attend to keys s ≤ t that are real items. Right padding keeps
        key 0 real for every query, so no attention row is empty."""
        T = items.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()
        return (causal & (items != 0)[:, None, :])[:, None]

    def encode(self, items: Tensor, lengths: Tensor) -> Tensor:
        """items: (B, T), lengths: (B,) ≥ 1 → the state at each sequence's last real item, (B, D)."""
        states = self.forward(items)
        return states[torch.arange(items.shape[0], device=items.device), lengths - 1]

    def scores(self, h: Tensor) -> Tensor:
        """h: (B, D) → scores over all ids (B, n_items + 1); column 0 (padding) is -inf."""
        logits = h @ self.item_emb.weight.T  # tied weights: the input table scores the output
        logits[:, 0] = -math.inf
        return logits

    def next_item_loss(self, h: Tensor, targets: Tensor) -> Tensor:
        """h: (M, D), targets: (M,) → the mean full-softmax cross-entropy, equal to
        ``F.cross_entropy(self.scores(h), targets)`` without building the (M, n_items + 1) logits
        (model.softmax: a training step's largest cost)."""
        return full_softmax_ce(h, self.item_emb.weight, targets)
