"""The DiT model (Peebles & Xie): one class for the reference path and the fast path, same parameters."""
import torch
import torch.nn.functional as F
from torch import nn

from dit_fast.attention import AUTO, resolve_backend
from dit_fast.blocks import (
    AdaLNBlock,
    AdaLNZeroBlock,
    CrossAttention,
    CrossAttentionBlock,
    FinalLayer,
    InContextBlock,
    SelfAttention,
)
from dit_fast.config import DiTConfig, get_config
from dit_fast.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from dit_fast.fused_blocks import FusedAdaLNBlock, FusedAdaLNZeroBlock, FusedFinalLayer
from dit_fast.kernels import ln_modulate

BLOCK_CLASSES = {
    "adaLN-Zero": AdaLNZeroBlock,
    "adaLN": AdaLNBlock,
    "cross-attention": CrossAttentionBlock,
    "in-context": InContextBlock,
}


def _block_and_final_classes(block: str, fused: bool) -> tuple[type, type]:
    """The layer classes for a block type; the fused ones hold the same parameters as the reference ones."""
    if not fused:
        return BLOCK_CLASSES[block], FinalLayer
    fused_blocks = {"adaLN-Zero": FusedAdaLNZeroBlock, "adaLN": FusedAdaLNBlock}
    return fused_blocks.get(block, BLOCK_CLASSES[block]), FusedFinalLayer
CFG_CHANNELS = (3, "all")


class DiT(nn.Module):
    """Diffusion Transformer over (N, C, H, W) latents, conditioned on timesteps and class labels.

    fused=False is the pure-PyTorch reference; fused=True computes the same function with the Triton ops
    of dit_fast.kernels and, for adaLN-Zero, one matrix product for the adaLN projections of all blocks
    (`hoist_modulation`; FSDP turns it off, since it reads every block's weights outside that block).
    `attn` names a dit_fast.attention backend or "auto". The state_dict is the same either way.
    """

    def __init__(self, cfg: DiTConfig, fused: bool = False, attn: str = "math"):
        super().__init__()
        self.cfg = cfg
        self.fused = fused
        self.attn = attn
        self.hoist_modulation = fused and cfg.block == "adaLN-Zero"
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.num_classes = cfg.num_classes
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d, as_matmul=fused)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d), requires_grad=False)
        block_class, final_class = _block_and_final_classes(cfg.block, fused)
        self.blocks = nn.ModuleList(
            block_class(d, cfg.num_heads, int(d * cfg.mlp_ratio), attn) for _ in range(cfg.depth)
        )
        self.final_layer = final_class(d, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's init: xavier linears, fixed sin-cos positions, N(0, 0.02) embeddings, zero adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid_size = int(self.cfg.num_patches**0.5)
        self.pos_embed.data.copy_(sincos_2d(self.cfg.hidden_size, grid_size).float().unsqueeze(0))
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            if isinstance(block, AdaLNZeroBlock):
                block.zero_init()
        final = self.final_layer
        for layer in (final.adaLN_modulation[-1], final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) images."""
        n, t, _ = x.shape
        p, c = self.patch_size, self.out_channels
        side = int(t**0.5)
        x = x.reshape(n, side, side, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, side * p, side * p)

    def run_blocks(self, x: torch.Tensor, t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
        """The transformer body; how conditioning enters depends on the block type."""
        block = self.cfg.block
        if block in ("adaLN-Zero", "adaLN"):
            c = t_emb + y_emb  # (N, D)
            for layer in self.blocks:
                x = layer(x, c)
        elif block == "cross-attention":
            context = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
            for layer in self.blocks:
                x = layer(x, context)
        else:  # in-context: two extra tokens, dropped after the last block
            x = torch.cat([t_emb.unsqueeze(1), y_emb.unsqueeze(1), x], dim=1)  # (N, 2 + T, D)
            for layer in self.blocks:
                x = layer(x)
            x = x[:, 2:]
        return x

    def hoisted_modulation_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """adaLN projections of every block and the final layer stacked: (depth*6D + 2D, D) and bias."""
        linears = [block.adaLN_modulation[1] for block in self.blocks] + [self.final_layer.adaLN_modulation[1]]
        return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])

    def run_hoisted(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """adaLN-Zero body with all adaLN projections in one matrix product and norms fused across blocks.

        Returns the final layer's output (N, T, p*p*C_out); the final layer's shift/scale come from the same
        product.
        """
        n, d, depth = c.shape[0], self.cfg.hidden_size, self.cfg.depth
        weight, bias = self.hoisted_modulation_weights()
        mods = F.linear(F.silu(c), weight, bias).view(n, 6 * depth + 2, d)  # (N, 6*depth + 2, D)
        # One unbind: its backward stacks the per-view gradients in one kernel, where slicing would
        # zero-fill and add into the whole (N, 6*depth + 2, D) gradient once per view.
        rows = mods.unbind(1)  # 6*depth + 2 strided (N, D) views
        h = ln_modulate(x, rows[0], rows[1])  # later norms come fused with the previous residual
        for i, block in enumerate(self.blocks):
            following = rows[6 * i + 6 : 6 * i + 8] if i + 1 < depth else (None, None)
            x, h = block.forward_chained(x, h, rows[6 * i : 6 * i + 6], *following)
        return self.final_layer.forward_modulated(x, rows[-2:])

    def resolve_attention(self, tokens: torch.Tensor) -> None:
        """Turn attn="auto" into a concrete backend for these tokens' device/dtype/length, outside compiled code."""
        if self.attn != AUTO or torch.compiler.is_compiling():
            return
        head_dim = self.cfg.head_dim
        backend = resolve_backend(AUTO, tokens.device, tokens.dtype, head_dim, tokens.shape[1], torch.is_grad_enabled())
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.backend = backend

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels (num_classes = null) -> (N, C_out, H, W).

        The fast path computes in its parameters' dtype and returns the input's dtype.
        """
        in_dtype = x.dtype
        if self.fused:
            x = x.to(self.x_embedder.proj.weight.dtype)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        self.resolve_attention(x)
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, self.training)  # (N, D)
        if self.hoist_modulation:
            x = self.run_hoisted(x, t_emb + y_emb)  # (N, T, p*p*C_out)
        else:
            x = self.final_layer(self.run_blocks(x, t_emb, y_emb), t_emb + y_emb)  # (N, T, p*p*C_out)
        out = self.unpatchify(x)
        return out.to(in_dtype) if self.fused else out

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile(fullgraph=True) each block on its own (FSDP's unit when it shards per block).

        The blocks share one code object, and each (batch size, grad mode, last block or not) is its own
        compiled entry, so the recompile limit is raised past Dynamo's default of 8.
        """
        compile_kwargs.setdefault("fullgraph", True)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.blocks:
            if self.hoist_modulation:
                block.forward_chained = torch.compile(block.forward_chained, **compile_kwargs)
            else:
                block.compile(**compile_kwargs)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: int | str = 3
    ) -> torch.Tensor:
        """Classifier-free guidance over a batch whose first half is conditional and second half unconditional.

        cfg_channels=3 guides only the first 3 output channels, as the official code does (this gives the
        published FID); "all" guides every eps channel, the standard method.
        """
        if cfg_channels not in CFG_CHANNELS:
            raise ValueError(f"cfg_channels {cfg_channels!r} is not valid; choose 3 or 'all'")
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)  # (N, C_out, H, W)
        guided = 3 if cfg_channels == 3 else self.in_channels
        eps, rest = out[:, :guided], out[:, guided:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def create_model(
    name: str,
    image_size: int | None = None,
    block: str = "adaLN-Zero",
    fused: bool = False,
    attn: str | None = None,
    **overrides,
) -> DiT:
    """A DiT by name ("DiT-XL/2", ...); image_size None keeps the config's (256px for the paper's models).

    fused=True is the fast path; attn defaults to "math" for the reference and "auto" for the fast path.
    """
    attn = attn or (AUTO if fused else "math")
    return DiT(get_config(name, image_size=image_size, block=block, **overrides), fused=fused, attn=attn)
