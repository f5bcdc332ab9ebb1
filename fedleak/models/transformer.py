"""The small causal transformer of the LTI paper's language task.

The paper attacks "a three-layer transformer with frozen token embedding layer, about 1.1M
trainable parameters" trained on WikiText sequences of L = 16 tokens, following the breaching
library's `transformer3` (Federated Learning field guide): width 96, 8 heads of 12 dimensions,
feed-forward 1536, ReLU, no dropout, post-norm blocks, learned positions for up to 1,024 tokens.
Here the token embedding is a buffer (frozen: it is never trained, never part of an update)
and the output layer reuses it (tied) with a trainable bias, so the trainable parameters are
the three blocks (1,002,528), the positions (98,304) and the bias (one per token):
1,100,832 + V, about 1.1M for the vocabulary sizes used here.

`forward` takes token ids [B, L] (int64) or, as optimisation attacks (TAG) need, their rows of
the embedding table [B, L, 96] (float): the lookup is the only non-differentiable step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_POSITIONS = 1024
EMBEDDING_RANGE = 0.1


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each position sees itself and the positions before it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        # Written out (no fused kernel), so that vmap and double backward work everywhere.
        b, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        shape = (b, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // self.heads)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        mixed = torch.softmax(scores, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(b, length, width))


class Block(nn.Module):
    """Post-norm transformer block (as torch's TransformerEncoderLayer): x + attention, norm,
    x + feed-forward, norm."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(width, heads)
        self.norm1 = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)
        )
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.feed_forward(x))


class TiedOutput(nn.Module):
    """Next-token logits from the (frozen) token embedding and a trainable bias per token."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        return h @ embedding.T + self.bias


class CausalTransformer(nn.Module):
    """Token ids (or embeddings) [B, L] -> next-token logits [B, L, V]."""

    def __init__(
        self,
        vocab_size: int,
        width: int = 96,
        heads: int = 8,
        hidden: int = 1536,
        layers: int = 3,
        max_positions: int = MAX_POSITIONS,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.width = width
        self.max_positions = max_positions
        # Frozen: a buffer travels with the weights but is never trained or shared as update.
        # breaching's scales: U(-0.1, 0.1), times sqrt(width) on the way in, so inputs are of
        # unit scale while the tied output layer starts with smooth logits (std about 0.6).
        table = torch.empty(vocab_size, width).uniform_(-EMBEDDING_RANGE, EMBEDDING_RANGE)
        self.register_buffer("token_embedding", table)
        self.positions = nn.Embedding(max_positions, width)
        self.blocks = nn.ModuleList(Block(width, heads, hidden) for _ in range(layers))
        self.output = TiedOutput(vocab_size)

    def embed(self, tokens: Tensor) -> Tensor:
        """The (frozen) embeddings [B, L, width] of token ids [B, L]."""
        return F.embedding(tokens, self.token_embedding)

    def forward(self, x: Tensor) -> Tensor:
        h = (x if x.is_floating_point() else self.embed(x)) * math.sqrt(self.width)
        if h.shape[1] > self.max_positions:
            raise ValueError(f"sequences of {h.shape[1]} tokens exceed {self.max_positions}")
        h = h + self.positions.weight[: h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.output(h, self.token_embedding)
