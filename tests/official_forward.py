"""An independent, functional DiT forward over an official-format state_dict (adaLN-Zero).

Written from the paper and the official architecture (timm PatchEmbed/Attention/Mlp with the DiT block),
one tensor expression per step, so that the module-based model is checked against a second derivation
that reads weights only through the official key names.
"""
import math

import torch
import torch.nn.functional as F


def _linear(sd, prefix, x):
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _timestep_features(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _pos_embed(dim, grid):
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(dim // 2, xs), one_axis(dim // 2, ys)], dim=1).float()


def official_forward(sd, x, t, y, num_heads, patch):
    """Output (N, 2C, H, W) of the official DiT for weights `sd` on latents x, timesteps t, labels y."""
    n, _, height, _ = x.shape
    w = sd["x_embedder.proj.weight"]
    tokens = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    tokens = tokens + sd["pos_embed"]
    temb = _linear(sd, "t_embedder.mlp.2", F.silu(_linear(sd, "t_embedder.mlp.0", _timestep_features(t))))
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    dim = tokens.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        mods = _linear(sd, f"{b}.adaLN_modulation.1", F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = F.layer_norm(tokens, (dim,), eps=1e-6) * (1 + mods[1]) + mods[0]
        qkv = _linear(sd, f"{b}.attn.qkv", h).reshape(n, -1, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        scores = (qkv[0] @ qkv[1].transpose(-2, -1)) / math.sqrt(dim // num_heads)
        att = (scores.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(n, -1, dim)
        tokens = tokens + mods[2] * _linear(sd, f"{b}.attn.proj", att)
        h = F.layer_norm(tokens, (dim,), eps=1e-6) * (1 + mods[4]) + mods[3]
        mlp = _linear(sd, f"{b}.mlp.fc2", F.gelu(_linear(sd, f"{b}.mlp.fc1", h), approximate="tanh"))
        tokens = tokens + mods[5] * mlp
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
    out = _linear(sd, "final_layer.linear", F.layer_norm(tokens, (dim,), eps=1e-6) * (1 + scale) + shift)
    side = height // patch
    c_out = out.shape[-1] // (patch * patch)
    out = out.reshape(n, side, side, patch, patch, c_out)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, c_out, side * patch, side * patch)
