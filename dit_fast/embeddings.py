"""DiT's input embedders: patches, fixed 2-D sin-cos positions, timesteps and class labels."""
import math

import torch
from torch import nn

FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sin of the first dim/2 frequencies, then cos (MAE's convention)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / MAX_PERIOD**omega  # (dim/2,)
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) fixed position embedding, row-major tokens; first half encodes the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (T, dim)


class PatchEmbed(nn.Module):
    """(N, C, H, W) latents -> (N, T, D) tokens by a stride-p convolution (T = (H/p)*(W/p)).

    as_matmul computes the same map as one matrix product over the unfolded patches, giving contiguous
    tokens; the convolution's (N, D, T) output, transposed, is not contiguous, and on the GPU every
    consumer then pays a copy of the whole activation (the fast path's choice).
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, as_matmul: bool = False):
        super().__init__()
        self.as_matmul = as_matmul
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_matmul:
            return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)
        n, c, h, w = x.shape
        p = self.proj.stride[0]
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
        patches = patches.reshape(-1, c * p * p)  # (N*T, C*p*p), in the conv weight's (C, p, p) order
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, C*p*p)
        return torch.addmm(self.proj.bias, patches, weight.t()).view(n, -1, weight.shape[0])  # (N, T, D)


def timestep_frequencies(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE) -> torch.Tensor:
    """(N,) possibly fractional timesteps -> (N, dim) [cos, sin] features over geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Timesteps -> (N, D) by sinusoidal frequencies and a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_frequencies(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop_labels(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random with dropout_prob, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)
