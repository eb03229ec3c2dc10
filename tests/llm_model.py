"""A Llama-shaped decoder built in code, shared by ``benchmarks/llm.py`` and the tests.

RMSNorm, rotary attention with grouped key/value heads, a SwiGLU MLP and tied or untied
token embeddings, randomly initialised (no download). Only torch modules that every
simulator quantizes are leaves (``nn.Embedding``, ``nn.Linear``, ``nn.RMSNorm``, ``nn.SiLU``);
the rotary embedding, attention product, residual adds and the SwiGLU product are functional
ops inside the blocks, as in the Hugging Face Llama code. ``benchmarks`` is not a package, so
this file lives beside the tests and the benchmark puts ``tests/`` on its import path.

Sizes (:data:`CONFIGS`): ``tiny`` (tests, 0.1M parameters), ``50m`` (the CPU benchmark, 56M)
and ``1b`` (a Llama-3.2-1B-like shape with a 32k vocabulary, 1.1B; for a GPU).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The shape of a :class:`Decoder`. ``hidden`` is the SwiGLU width; ``kv_heads`` divides
    ``heads`` (grouped-query attention)."""

    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    max_seq: int = 2048
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


CONFIGS: Dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, hidden=128,
                          max_seq=128),
    "50m": DecoderConfig(vocab=32000, dim=512, layers=8, heads=8, kv_heads=4, hidden=1408),
    "1b": DecoderConfig(vocab=32000, dim=2048, layers=16, heads=32, kv_heads=8, hidden=8192,
                        tie_embeddings=True),
}


def rotary_tables(cfg: DecoderConfig, seq: int, device=None) -> torch.Tensor:
    """cos and sin of the rotary angles, shape ``(2, seq, head_dim / 2)``."""
    half = cfg.dim // cfg.heads // 2
    inv_freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float32, device=device) / half)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv_freq)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's features of ``x`` (batch, heads, seq, head_dim)."""
    cos, sin = table[0], table[1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions and grouped key/value heads."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, table), apply_rotary(k, table)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.attn(self.input_norm(x), table)
        return x + self.mlp(self.post_attn_norm(x))


class Decoder(nn.Module):
    """Token ids ``(batch, seq)`` -> logits ``(batch, seq, vocab)``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rotary", rotary_tables(cfg, cfg.max_seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        table = self.rotary[:, :tokens.shape[1]]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, table)
        return self.lm_head(self.norm(x))


def build_decoder(size: str = "tiny", seed: int = 0, device=None,
                  dtype: Optional[torch.dtype] = None, **overrides) -> Decoder:
    """A randomly initialised :class:`Decoder` of a named size (``overrides`` change fields of
    its config, e.g. ``tie_embeddings=True``), in eval mode. Linear and embedding weights are
    drawn from N(0, 0.02) as in Llama's initialisation, with the output projections scaled by
    ``1 / sqrt(2 * layers)``, so activations keep a realistic range through the depth."""
    cfg = dataclasses.replace(CONFIGS[size], **overrides)
    g = torch.Generator().manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 / (math.sqrt(2 * cfg.layers) if name.endswith(("o_proj.weight",
                                                                        "down_proj.weight"))
                              else 1.0)
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.to(device=device, dtype=dtype).eval()


def random_tokens(cfg: DecoderConfig, batch: int, seq: int, seed: int = 0,
                  device=None) -> torch.Tensor:
    """Uniformly random token ids ``(batch, seq)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab, (batch, seq), generator=g).to(device)
