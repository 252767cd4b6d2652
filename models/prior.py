"""Diffusion prior P: CLIP text embedding (+ text tokens) -> CLIP image embedding (DALL-E 2 / unCLIP).

A transformer reads [text tokens..., text embedding, timestep, noised image embedding,
query] and predicts the clean image embedding (prediction "sample", as in DALL-E 2)
from the query's output. Image embeddings are L2-normalised CLIP vectors scaled by
sqrt(D) so each coordinate has roughly unit variance, like the noise. The text's padding
tokens are masked out of attention, as in DALL-E 2: what the tokenizer pads a caption
with does not change its prediction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import ScalarEmbedding


class DiffusionPrior(nn.Module):
    def __init__(self, embed_dim: int, token_dim: int, width: int = 512, depth: int = 6, heads: int = 8,
                 dropout: float = 0.0, max_tokens: int = 77):
        super().__init__()
        self.kwargs = dict(embed_dim=embed_dim, token_dim=token_dim, width=width, depth=depth, heads=heads,
                           dropout=dropout, max_tokens=max_tokens)
        self.width, self.max_tokens = width, max_tokens
        self.token_proj = nn.Linear(token_dim, width)
        self.text_proj = nn.Linear(embed_dim, width)
        self.time_embed = ScalarEmbedding(width, width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(max_tokens + 4, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor,
                text_tokens: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t [B,D], t [B], text_emb [B,D], text_tokens [B,L,Dt], token_mask [B,L] (True: a token to
        attend to; None: all) -> [B,D]. Unconditional: zeros, with every token masked."""
        b = x_t.shape[0]
        parts, padding = [], None
        if text_tokens is not None:
            parts.append(self.token_proj(text_tokens[:, : self.max_tokens].to(x_t.dtype)))
            if token_mask is not None:  # the 4 vectors after the tokens are always attended to
                padding = F.pad(~token_mask[:, : self.max_tokens], (0, 4), value=False)
        parts += [
            self.text_proj(text_emb.to(x_t.dtype))[:, None],
            self.time_embed(t, x_t.dtype)[:, None],
            self.x_proj(x_t)[:, None],
            self.query.expand(b, 1, -1).to(x_t.dtype),
        ]
        h = torch.cat(parts, dim=1)
        h = h + self.pos[: h.shape[1]].to(h.dtype)
        h = self.transformer(h, src_key_padding_mask=padding)
        return self.out(self.norm(h[:, -1]))
