"""Analytic parameter counts and forward MACs of a DiT, plus training FLOPs and MFU helpers.

Counted as the paper counts its "Gflops" (which are multiply-accumulates, MACs): every linear layer,
the patch-embedding convolution, and the two attention matmuls (Q K^T and A V). Biases, softmax,
LayerNorm, GELU/SiLU, modulation and residual adds are not counted; the label embedding is a lookup
(0 MACs). One MAC is two FLOPs. Per block type (mirroring dit_fast.blocks):

- adaLN-Zero: self-attention + MLP on T tokens, modulation Linear(D, 6D) on the conditioning vector.
- adaLN: the same with Linear(D, 4D) (shift and scale of both LayerNorms, no gates).
- cross-attention: no modulation; affine LayerNorms; after self-attention a cross-attention from the T
  tokens (q, proj: T x D x D each) to the 2 context tokens [t-emb, y-emb] (kv: 2 x D x 2D) with T x 2
  attention scores.
- in-context: no modulation; affine LayerNorms; T + 2 tokens through every block (t-emb and y-emb
  appended), dropped after the last block.
All four end in the same adaLN FinalLayer (Linear(D, 2D) modulation on t-emb + y-emb).
"""
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from dit_fast.config import DiTConfig, get_config
from dit_fast.embeddings import FREQUENCY_EMBEDDING_SIZE
from dit_fast.model import DiT

CONTEXT_TOKENS = 2  # [t-emb, y-emb], the conditioning of the cross-attention and in-context blocks
MODULATIONS_PER_BLOCK = {"adaLN-Zero": 6, "adaLN": 4, "cross-attention": 0, "in-context": 0}
FLOPS_PER_MAC = 2
TRAIN_FORWARD_MULTIPLE = 3  # forward + backward (grads of activations and of weights, each ~ a forward)

# The paper's forward "Gflops" (GMACs): the 12 models and the four XL/2 block types at 256px, XL/2 at 512px.
PAPER_GMACS = {
    ("DiT-S/8", "adaLN-Zero", 256): 0.36,
    ("DiT-S/4", "adaLN-Zero", 256): 1.41,
    ("DiT-S/2", "adaLN-Zero", 256): 6.06,
    ("DiT-B/8", "adaLN-Zero", 256): 1.42,
    ("DiT-B/4", "adaLN-Zero", 256): 5.56,
    ("DiT-B/2", "adaLN-Zero", 256): 23.0,
    ("DiT-L/8", "adaLN-Zero", 256): 5.01,
    ("DiT-L/4", "adaLN-Zero", 256): 19.70,
    ("DiT-L/2", "adaLN-Zero", 256): 80.70,
    ("DiT-XL/8", "adaLN-Zero", 256): 7.39,
    ("DiT-XL/4", "adaLN-Zero", 256): 29.04,
    ("DiT-XL/2", "adaLN-Zero", 256): 118.6,
    ("DiT-XL/2", "adaLN", 256): 118.6,
    ("DiT-XL/2", "cross-attention", 256): 137.6,
    ("DiT-XL/2", "in-context", 256): 119.4,
    ("DiT-XL/2", "adaLN-Zero", 512): 524.6,
}
PAPER_PARAMS = {("DiT-XL/2", "adaLN-Zero", 256): 675_129_632}


@dataclass(frozen=True)
class Cost:
    """Parameters and forward MACs (per image) of one part of the model."""

    params: int
    macs: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.macs + other.macs)

    def __mul__(self, times: int) -> "Cost":
        return Cost(self.params * times, self.macs * times)


def linear_cost(in_features: int, out_features: int, tokens: int) -> Cost:
    """nn.Linear with bias applied to `tokens` vectors."""
    return Cost(in_features * out_features + out_features, tokens * in_features * out_features)


def attention_matmul_macs(query_tokens: int, key_tokens: int, hidden_size: int) -> int:
    """Q K^T and A V summed over heads: 2 x Tq x Tk x D."""
    return 2 * query_tokens * key_tokens * hidden_size


def affine_layer_norm_cost(hidden_size: int) -> Cost:
    return Cost(2 * hidden_size, 0)


def block_cost(cfg: DiTConfig) -> Cost:
    """One transformer block of cfg.block type, per image."""
    if cfg.block not in MODULATIONS_PER_BLOCK:
        raise ValueError(f"unknown block {cfg.block!r}; choose one of {', '.join(MODULATIONS_PER_BLOCK)}")
    d = cfg.hidden_size
    mlp_hidden = int(d * cfg.mlp_ratio)
    tokens = cfg.num_patches + (CONTEXT_TOKENS if cfg.block == "in-context" else 0)
    self_attention = linear_cost(d, 3 * d, tokens) + linear_cost(d, d, tokens)
    self_attention += Cost(0, attention_matmul_macs(tokens, tokens, d))
    mlp = linear_cost(d, mlp_hidden, tokens) + linear_cost(mlp_hidden, d, tokens)
    cost = self_attention + mlp
    modulations = MODULATIONS_PER_BLOCK[cfg.block]
    if modulations:  # norm1, norm2 have no affine parameters; c regresses them
        return cost + linear_cost(d, modulations * d, 1)
    cost += affine_layer_norm_cost(d) * 2  # norm1, norm2
    if cfg.block == "cross-attention":
        cross_attention = linear_cost(d, d, tokens) + linear_cost(d, 2 * d, CONTEXT_TOKENS) + linear_cost(d, d, tokens)
        cross_attention += Cost(0, attention_matmul_macs(tokens, CONTEXT_TOKENS, d))
        cost += cross_attention + affine_layer_norm_cost(d)  # + norm_cross
    return cost


def cost_breakdown(cfg: DiTConfig) -> dict[str, Cost]:
    """Cost of each top-level module of dit_fast.model.DiT, keyed by its attribute name."""
    d, p, tokens = cfg.hidden_size, cfg.patch_size, cfg.num_patches
    patch_values = cfg.in_channels * p * p
    label_rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)  # + the null class of CFG
    return {
        "x_embedder": Cost(patch_values * d + d, tokens * patch_values * d),
        "t_embedder": linear_cost(FREQUENCY_EMBEDDING_SIZE, d, 1) + linear_cost(d, d, 1),
        "y_embedder": Cost(label_rows * d, 0),
        "pos_embed": Cost(tokens * d, 0),
        "blocks": block_cost(cfg) * cfg.depth,
        "final_layer": linear_cost(d, p * p * cfg.out_channels, tokens) + linear_cost(d, 2 * d, 1),
    }


def total_cost(cfg: DiTConfig) -> Cost:
    return sum(cost_breakdown(cfg).values(), Cost(0, 0))


def param_count(cfg: DiTConfig) -> int:
    """All parameters, the frozen pos_embed included (675,129,632 for DiT-XL/2)."""
    return total_cost(cfg).params


def forward_macs(cfg: DiTConfig) -> int:
    """Multiply-accumulates of one forward pass of one image (no classifier-free guidance doubling)."""
    return total_cost(cfg).macs


def forward_gmacs(cfg: DiTConfig) -> float:
    """The paper's "Gflops" figure: forward GMACs per image."""
    return forward_macs(cfg) / 1e9


def model_flops(cfg: DiTConfig, batch_size: int = 1, train: bool = False) -> int:
    """FLOPs (2 per MAC) of a forward pass, or of a training step (3x forward) when train=True."""
    return forward_macs(cfg) * FLOPS_PER_MAC * batch_size * (TRAIN_FORWARD_MULTIPLE if train else 1)


def train_flops_per_image(cfg: DiTConfig) -> int:
    """FLOPs of one training image: forward + backward = 3x the forward (712 GFLOP for DiT-XL/2 at 256px)."""
    return model_flops(cfg, train=True)


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the fraction of the (measured) peak that the model's FLOPs achieve."""
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_s!r}")
    return achieved_flops_per_s / peak_flops_per_s


def counted_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of model(x, t, y) as torch.utils.flop_counter counts them (matmuls, convolutions, SDPA; 2 per MAC).

    Attention run by an op the counter does not know (e.g. SDPA's CPU kernel) is missed; use the "math"
    attention backend for a complete count.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def counted_forward_flops(cfg: DiTConfig, batch_size: int = 1) -> int:
    """counted_flops of a forward of the reference model (math attention) built under FakeTensorMode.

    Fake tensors carry shapes only, so even DiT-XL/2 at 512px is counted in about a second with no
    memory; this checks the analytic count against what the model really executes.
    """
    with FakeTensorMode():
        model = DiT(cfg, attn="math").eval()
        side = cfg.input_size
        x = torch.randn(batch_size, cfg.in_channels, side, side)  # (N, C, H, W)
        t = torch.rand(batch_size) * 999  # (N,)
        y = torch.zeros(batch_size, dtype=torch.long)  # (N,)
        return counted_flops(model, x, t, y)


def flop_table() -> list[dict]:
    """Params and forward GMACs of every configuration the paper reports, beside the paper's figure."""
    rows = []
    for model_name, block, image_size in PAPER_GMACS:
        cfg = get_config(model_name, image_size=image_size, block=block)
        gmacs = forward_gmacs(cfg)
        paper_gmacs = PAPER_GMACS[(model_name, block, image_size)]
        rows.append(
            {
                "model": model_name,
                "block": block,
                "image_size": image_size,
                "params": param_count(cfg),
                "gmacs": gmacs,
                "gflops": gmacs * FLOPS_PER_MAC,
                "paper_gmacs": paper_gmacs,
                "diff_pct": 100.0 * (gmacs - paper_gmacs) / paper_gmacs,
            }
        )
    return rows
