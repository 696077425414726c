"""Transformer layers of DiT and its four conditioning blocks (adaLN-Zero, adaLN, cross-attention, in-context).

Key names follow the official DiT code (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2,
adaLN_modulation.1) so its released checkpoints load with strict=True.
"""
import torch
from torch import nn

from dit_fast.attention import attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: per-sample (N, D) shift and scale broadcast over the T tokens of (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def plain_layer_norm(hidden_size: int) -> nn.LayerNorm:
    """The LayerNorm of the modulated blocks: no affine parameters, eps 1e-6."""
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; the backend is a name from dit_fast.attention."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.unbind(2)  # (N, T, H, Dh) views in the layout cuDNN and flash-attn take
        out = attention(q, k, v, backend=self.backend)  # (N, T, H, Dh)
        return self.proj(out.reshape(n, t, d))


class CrossAttention(nn.Module):
    """Multi-head attention of the T image tokens over a short context (here [t-emb, y-emb])."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        q = self.q(x).view(n, t, heads, head_dim)  # (N, T, H, Dh)
        k, v = self.kv(context).view(n, context.shape[1], 2, heads, head_dim).unbind(2)  # (N, S, H, Dh)
        out = attention(q, k, v, backend=self.backend)  # (N, T, H, Dh)
        return self.proj(out.reshape(n, t, d))


class Mlp(nn.Module):
    """Two linears around a tanh-approximate GELU, hidden width mlp_ratio * D."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ModulatedBlock(nn.Module):
    """Self-attention and MLP behind affine-free LayerNorms, modulated per sample by adaLN from c."""

    num_modulations = 6

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, attn_backend: str):
        super().__init__()
        self.norm1 = plain_layer_norm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads, attn_backend)
        self.norm2 = plain_layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.num_modulations * hidden_size))


class AdaLNZeroBlock(ModulatedBlock):
    """The paper's default block: adaLN shift/scale and zero-initialised residual gates (6D outputs)."""

    num_modulations = 6

    def zero_init(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class AdaLNBlock(ModulatedBlock):
    """adaLN without gates: c regresses the shift and scale of both LayerNorms (4D outputs)."""

    num_modulations = 4

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class InContextBlock(nn.Module):
    """Plain pre-norm ViT block; conditioning arrives as two extra tokens in the sequence."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, attn_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(InContextBlock):
    """The plain block with a cross-attention over the context [t-emb, y-emb] after the self-attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, attn_backend: str):
        super().__init__(hidden_size, num_heads, mlp_hidden, attn_backend)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, attn_backend)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = plain_layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)
