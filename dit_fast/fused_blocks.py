"""Fast-path variants of DiT's layers: the same parameters as dit_fast.blocks, computed with the Triton ops.

A fused adaLN-Zero block passes over the (N, T, D) activations in two fused kernels plus the matrix
products: `gated_residual_ln_modulate` after attention (residual + next LayerNorm + modulate), and at the
end of the block either `gated_residual` or, when the next block's shift/scale are at hand (adaLN
projections hoisted), `gated_residual_ln_modulate` again, which also does the next block's first norm.
"""
import torch
import torch.nn.functional as F

from dit_fast.blocks import AdaLNBlock, AdaLNZeroBlock, FinalLayer, Mlp
from dit_fast.kernels import bias_gelu, final_layer, gated_residual, gated_residual_ln_modulate, ln_modulate


class FusedMlp(Mlp):
    """Mlp whose bias + tanh-GELU is fused: into fc1's matmul without gradients on CUDA, else a Triton op.

    Without gradients on CUDA, fc1 + bias + GELU is one cuBLASLt matmul with a GELU epilogue (the tanh
    approximation; PyTorch's CPU kernel for the same op uses the exact GELU, so the epilogue is CUDA-only).
    Otherwise (training, or `gelu_epilogue=False`, which turns the epilogue off for measuring it, or the
    CPU, where the Triton interpreter runs it as it does the other fused ops) fc1 is a plain matmul and
    `bias_gelu` (kernels/bias_gelu.py) adds the bias and applies GELU in one bandwidth-bound kernel, with a
    backward kernel that writes the pre-activation gradient and fc1's bias gradient in the same pass.
    """

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__(hidden_size, mlp_hidden)
        self.gelu_epilogue = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_epilogue and x.is_cuda and not torch.is_grad_enabled():
            rows = x.reshape(-1, x.shape[-1])  # (N*T, D)
            hidden = torch._addmm_activation(self.fc1.bias, rows, self.fc1.weight.t(), use_gelu=True)
            return self.fc2(hidden).view(*x.shape[:-1], -1)
        z = F.linear(x, self.fc1.weight)  # (N, T, mlp_hidden), no bias
        return self.fc2(bias_gelu(z, self.fc1.bias.to(z.dtype)))  # the cast is a no-op unless under autocast


class FusedAdaLNZeroBlock(AdaLNZeroBlock):
    """adaLN-Zero with fused LayerNorm/modulate/gated-residual kernels; same parameters as AdaLNZeroBlock."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, attn_backend: str):
        super().__init__(hidden_size, num_heads, mlp_hidden, attn_backend)
        self.mlp = FusedMlp(hidden_size, mlp_hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Self-contained block (its own adaLN projection): the form FSDP shards and compiles per block."""
        mods = self.adaLN_modulation(c).view(c.shape[0], 6, -1).unbind(1)  # 6 strided (N, D) views
        h = ln_modulate(x, mods[0], mods[1])
        x, _ = self.forward_chained(x, h, mods)
        return x

    def forward_chained(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        mods: tuple[torch.Tensor, ...],
        next_shift: torch.Tensor | None = None,
        next_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, T, D) residual stream and h = its first modulated norm; mods this block's six (N, D) adaLN
        outputs (shift, scale, gate for attention, then for the MLP).

        Returns the new residual stream and, given the next block's shift/scale, its first modulated norm.
        """
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x, h = gated_residual_ln_modulate(x, self.attn(h), gate_msa, shift_mlp, scale_mlp)
        m = self.mlp(h)  # (N, T, D)
        if next_shift is None:
            return gated_residual(x, m, gate_mlp), None
        return gated_residual_ln_modulate(x, m, gate_mlp, next_shift, next_scale)


class FusedAdaLNBlock(AdaLNBlock):
    """adaLN (no gates) with the fused LayerNorm + modulate kernel; same parameters as AdaLNBlock."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, attn_backend: str):
        super().__init__(hidden_size, num_heads, mlp_hidden, attn_backend)
        self.mlp = FusedMlp(hidden_size, mlp_hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).view(c.shape[0], 4, -1).unbind(1)
        x = x + self.attn(ln_modulate(x, shift_msa, scale_msa))
        return x + self.mlp(ln_modulate(x, shift_mlp, scale_mlp))


class FusedFinalLayer(FinalLayer):
    """LayerNorm + modulate + the output linear in one memory-bound kernel that reads x once."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward_modulated(x, self.adaLN_modulation(c).view(c.shape[0], 2, -1).unbind(1))

    def forward_modulated(self, x: torch.Tensor, mods: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (N, T, D) with precomputed (N, D) shift and scale -> (N, T, p*p*C_out)."""
        shift, scale = mods
        return final_layer(x, shift, scale, self.linear.weight, self.linear.bias)
