"""Training data: the data sources, the global-batch sampler and its position, and each step's random draws."""

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dit_fast.data import SyntheticDataset
from dit_fast.extract import load_encoder
from dit_fast.image_data import ImageFolder, flip_where, uint8_to_model_range
from dit_fast.latent_data import LatentShards, sample_posterior
from dit_fast.parallel import DistEnv
from dit_fast.train_errors import UsageError
from dit_fast.train_hooks import TrainHooks


class SyntheticLatents(SyntheticDataset):
    """The embedded dataset as latents, fetched a batch at a time by the DataLoader."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_batch(indices)


def mixed_seed(*numbers: int) -> int:
    """A 63-bit seed from a tuple of integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class DataPosition:
    """Where the next batch comes from: the epoch and the global batch within it."""

    epoch: int = 0
    batch: int = 0


class GlobalBatchSampler:
    """This rank's slice of every global batch of a per-epoch shuffle (drop-last); starts mid-epoch to resume.

    The global batches do not depend on the world size: rank r of W takes the r-th of W equal slices.
    """

    def __init__(self, num_items: int, global_batch: int, env: DistEnv, seed: int):
        if num_items < global_batch:
            raise UsageError(f"the dataset has {num_items} items, fewer than one global batch of {global_batch}")
        self.num_items = num_items
        self.global_batch = global_batch
        self.local_batch = global_batch // env.world_size
        self.rank = env.rank
        self.seed = seed
        self.batches_per_epoch = num_items // global_batch
        self.position = DataPosition()

    def set_position(self, position: DataPosition) -> None:
        """Like DistributedSampler.set_epoch, plus the batch to start from."""
        self.position = position

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position.batch

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(
            self.num_items, generator=torch.Generator().manual_seed(mixed_seed(self.seed, self.position.epoch))
        )
        for batch in range(self.position.batch, self.batches_per_epoch):
            start = batch * self.global_batch + self.rank * self.local_batch
            yield order[start : start + self.local_batch].tolist()


def next_position(position: DataPosition, batches_per_epoch: int) -> DataPosition:
    if position.batch + 1 < batches_per_epoch:
        return DataPosition(position.epoch, position.batch + 1)
    return DataPosition(position.epoch + 1, 0)


def epoch_batches(
    loader: DataLoader, sampler: GlobalBatchSampler, start: DataPosition
) -> Iterator[tuple[DataPosition, list]]:
    """(position, batch) pairs forever, from `start` on, epoch after epoch."""
    position = start
    while True:
        sampler.set_position(position)
        for batch in loader:
            yield position, batch
            position = next_position(position, sampler.batches_per_epoch)


@dataclass
class DataSource:
    """A dataset whose batches are (payload, labels), and how a payload becomes (N, C, h, w) latents."""

    kind: str  # "synthetic" | "images" | "latents"
    dataset: Dataset
    vae: object | None = None  # encodes "images"; decodes sample grids when present

    def to_latents(self, payload: torch.Tensor, flip: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.kind == "synthetic":
            return payload.float()  # (N, C, h, w)
        if self.kind == "latents":
            return sample_posterior(payload, flip, eps)  # (N, C, h, w)
        with torch.no_grad():
            mean, std = self.vae.encode(flip_where(uint8_to_model_range(payload), flip))  # (N, C, h, w) each
        return mean.float() + std.float() * eps


def load_vae(source: str, device: torch.device, encode: bool):
    """dit_fast.vae.VAE from a hub id or a local directory; a usage error when diffusers or the weights are missing."""
    alternative = "pass --latents DIR with latents made by `python -m dit_fast.extract`" if encode else "drop --vae"
    try:
        return load_encoder(source, device, alternative)
    except (ImportError, FileNotFoundError) as error:  # no diffusers, no weights
        raise UsageError(f"--vae {source!r}: {error}") from None


def check_dataset_classes(flag: str, path: str, dataset_classes: int, num_classes: int) -> None:
    """A dataset's labels 0..dataset_classes-1 must all index the model's label embedding (--num-classes rows)."""
    if dataset_classes > num_classes:
        raise UsageError(
            f"{flag} {path!r} has {dataset_classes} classes, so labels up to {dataset_classes - 1}, but --num-classes "
            f"{num_classes} takes labels in [0, {num_classes}); pass --num-classes {dataset_classes} (or more)"
        )


def make_data_source(args: argparse.Namespace, env: DistEnv, hooks: TrainHooks) -> DataSource:
    """The dataset the arguments name; the synthetic one draws labels from the first --num-classes of its classes."""
    if args.latents:
        try:
            dataset = LatentShards(args.latents)
        except FileNotFoundError as error:  # shards missing: extraction unfinished
            raise UsageError(f"--latents: {error}") from None
        vae = (
            hooks.vae if hooks.vae is not None else (load_vae(args.vae, env.device, encode=False) if args.vae else None)
        )
        return DataSource("latents", dataset, vae)
    if args.data_path:
        from dit_fast.vae import DEFAULT_VAE

        try:
            folder = ImageFolder(args.data_path, args.image_size)
        except FileNotFoundError as error:  # no class folders with images
            raise UsageError(f"--data-path: {error}") from None
        check_dataset_classes("--data-path", args.data_path, len(folder.classes), args.num_classes)
        vae = hooks.vae if hooks.vae is not None else load_vae(args.vae or DEFAULT_VAE, env.device, encode=True)
        return DataSource("images", folder, vae)
    dataset = SyntheticLatents(
        args.num_classes, args.image_size, args.synthetic_size, latent=True, seed=args.global_seed
    )
    return DataSource("synthetic", dataset, hooks.vae)


@dataclass
class StepRandomness:
    """This rank's slice of one step's random draws for the global batch."""

    t: torch.Tensor  # (n,) int64 diffusion steps
    noise: torch.Tensor  # (n, C, h, w) the diffusion noise
    eps: torch.Tensor  # (n, C, h, w) the VAE posterior sample
    drop_label: torch.Tensor  # (n,) bool, classifier-free guidance dropout
    flip: torch.Tensor  # (n,) bool, horizontal flip


def draw_step_randomness(
    seed: int,
    step: int,
    global_batch: int,
    latent_shape: tuple[int, int, int],
    num_timesteps: int,
    label_dropout: float,
    env: DistEnv,
) -> StepRandomness:
    """Draw for the whole global batch from a generator seeded by (seed, step), then slice this rank's part."""
    generator = torch.Generator(env.device).manual_seed(mixed_seed(seed, step))
    device, n = env.device, global_batch // env.world_size
    rows = slice(env.rank * n, (env.rank + 1) * n)
    t = torch.randint(0, num_timesteps, (global_batch,), generator=generator, device=device)  # (B,)
    noise = torch.randn((global_batch, *latent_shape), generator=generator, device=device)  # (B, C, h, w)
    eps = torch.randn((global_batch, *latent_shape), generator=generator, device=device)  # (B, C, h, w)
    uniform = torch.rand((2, global_batch), generator=generator, device=device)  # (2, B)
    return StepRandomness(t[rows], noise[rows], eps[rows], (uniform[0] < label_dropout)[rows], (uniform[1] < 0.5)[rows])
