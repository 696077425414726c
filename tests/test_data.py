"""The synthetic dataset: deterministic items, unit-scale latents, distinct classes a template matcher recognises."""
import itertools

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from dit_fast.images import to_uint8
from dit_fast.data import (
    LATENT_DOWNSAMPLE,
    MAX_CLASSES,
    SyntheticDataset,
    class_attributes,
    class_name,
    class_templates,
    image_to_latent,
    latent_to_rgb,
    nearest_class,
    render_templates,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Run single-threaded: the generators are many mid-sized elementwise ops, and on a busy 2-core machine
    intra-op thread hand-offs made them ~100x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_same_index_same_tensor_across_instances_and_access_paths():
    first = SyntheticDataset(num_classes=10, image_size=64, num_samples=100, seed=3)
    second = SyntheticDataset(num_classes=10, image_size=64, num_samples=100, seed=3)
    x7, y7 = first[7]
    assert torch.equal(x7, second[7][0]) and y7 == second[7][1]
    batch_x, batch_y = first.get_batch([5, 7, 99])
    assert torch.equal(batch_x[1], x7) and batch_y.tolist() == [5, 7, 9]
    assert torch.equal(first[-1][0], first[99][0])
    all_x, all_y = first.materialize(chunk_size=32)
    assert all_x.shape == (100, 4, 8, 8) and torch.equal(all_x[7], x7) and all_y[7] == y7


def test_seeds_and_indices_give_different_items():
    seed0 = SyntheticDataset(num_samples=50, seed=0)
    seed1 = SyntheticDataset(num_samples=50, seed=1)
    assert not torch.equal(seed0[4][0], seed1[4][0])
    assert seed0[4][1] == seed1[4][1] == 4
    assert not torch.equal(seed0[4][0], seed0[14][0])  # same class, different jitter


@pytest.mark.parametrize("image_size", [32, 40, 64, 256])
def test_shapes_and_value_ranges(image_size):
    side = image_size // LATENT_DOWNSAMPLE
    latents = SyntheticDataset(num_classes=1000, image_size=image_size, num_samples=64, seed=2)
    images = SyntheticDataset(num_classes=1000, image_size=image_size, num_samples=64, seed=2, latent=False)
    z, y = latents.get_batch(list(range(64)))
    x, y_images = images.get_batch(list(range(64)))
    assert z.shape == (64, 4, side, side) and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert x.shape == (64, 3, image_size, image_size) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(y, y_images) and y.dtype == torch.long
    assert torch.allclose(image_to_latent(x), z)  # the latent is the documented map of the image
    rgb_mean, rgb_std = z[:, :3].mean(dim=(0, 2, 3)), z[:, :3].std(dim=(0, 2, 3))
    assert (rgb_mean.abs() < 0.5).all() and ((rgb_std > 0.6) & (rgb_std < 1.5)).all(), (rgb_mean, rgb_std)
    assert 0.2 < z[:, 3].std() < 2.0


def test_latent_unit_scale_at_default_size():
    z, _ = SyntheticDataset(num_samples=500).materialize()
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    assert (mean.abs() < 0.3).all() and ((std > 0.7) & (std < 1.3)).all(), (mean, std)


def test_class_attributes_are_a_bijection_and_first_ten_differ_in_everything():
    shape, fg, bg = class_attributes(torch.arange(MAX_CLASSES))
    triples = set(zip(shape.tolist(), fg.tolist(), bg.tolist()))
    assert len(triples) == MAX_CLASSES
    for attribute in (shape, fg, bg):
        assert attribute[:10].unique().numel() == 10
    assert len(set(zip(fg[:100].tolist(), bg[:100].tolist()))) == 100  # first 100: the colour pair decides
    assert class_name(0) == "red disc on black" and class_name(1) == "green square on grey"
    assert len({class_name(k) for k in range(MAX_CLASSES)}) == MAX_CLASSES


@pytest.mark.parametrize("latent", [True, False])
def test_templates_pairwise_far_apart(latent):
    templates = class_templates(10, 64, latent=latent)
    flat = templates.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(10) * 1e9
    # the nearest other class is far beyond a sample's own distance to its template (the jitter)
    samples, labels = SyntheticDataset(num_samples=40, latent=latent, seed=5).materialize()
    own = (samples.flatten(1) - flat[labels]).norm(dim=1)
    assert distances.min() > 1.5 * own.median(), (distances.min(), own.median())


def test_all_thousand_templates_distinct():
    flat = class_templates(MAX_CLASSES, 64).flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(MAX_CLASSES) * 1e9
    assert distances.min() > 1.0


@pytest.mark.parametrize("latent", [True, False])
def test_nearest_class_recognises_held_out_samples(latent):
    templates = class_templates(10, 64, latent=latent)
    samples, labels = SyntheticDataset(num_samples=300, latent=latent, seed=11).materialize()
    accuracy = (nearest_class(samples, templates) == labels).float().mean()
    assert accuracy >= 0.95, accuracy


def test_nearest_class_many_classes_well_above_chance():
    templates = class_templates(100, 64)
    samples, labels = SyntheticDataset(num_classes=100, num_samples=500, seed=12).materialize()
    accuracy = (nearest_class(samples, templates) == labels).float().mean()
    assert accuracy >= 0.9, accuracy  # chance is 0.01


def test_nearest_class_rejects_noise_as_a_perfect_match():
    """Pure noise latents are assigned some class, but not consistently one per true label (sanity of the check)."""
    templates = class_templates(10, 64)
    labels = torch.arange(10).repeat(10)
    noise = torch.randn(100, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (nearest_class(noise, templates) == labels).float().mean() < 0.5


def test_latent_preview_round_trips_the_cell_colours():
    images, _ = SyntheticDataset(num_samples=8, latent=False, seed=4).materialize()
    preview = latent_to_rgb(image_to_latent(images))  # (N, H, W, 3)
    cell_colours = to_uint8(F.avg_pool2d(images, 8).repeat_interleave(8, 2).repeat_interleave(8, 3))
    assert preview.shape == (8, 64, 64, 3) and preview.dtype == np.uint8
    assert np.abs(preview.astype(int) - cell_colours.astype(int)).max() <= 1
    assert latent_to_rgb(image_to_latent(images), upsample=1).shape == (8, 8, 8, 3)


def test_labels_restriction():
    data = SyntheticDataset(num_classes=50, num_samples=30, labels=[3, 17, 42])
    assert [data[i][1] for i in range(6)] == [3, 17, 42, 3, 17, 42]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_classes": 0}, "num_classes 0"),
        ({"num_classes": 1001}, r"num_classes 1001 .*\[1, 1000\]"),
        ({"image_size": 60}, "image_size 60 must be a multiple of 8"),
        ({"image_size": 24}, "image_size 24 .* at least 32"),
        ({"num_samples": 0}, "num_samples 0"),
        ({"seed": -1}, "seed -1"),
        ({"labels": [0, 10]}, r"\[0, 10\); invalid: \[10\]"),
        ({"labels": [-1]}, r"invalid: \[-1\]"),
        ({"labels": []}, "non-empty"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticDataset(**kwargs)


def test_bad_calls_are_clear_errors():
    data = SyntheticDataset(num_samples=5)
    with pytest.raises(IndexError, match="index 5 out of range"):
        data[5]
    with pytest.raises(IndexError, match=r"indices \[-1, 7\] out of range \[0, 5\)"):
        data.get_batch([0, -1, 7])
    with pytest.raises(ValueError, match=r"class label 1000 must be an integer in \[0, 1000\)"):
        class_name(1000)
    with pytest.raises(ValueError, match="image_size 12"):
        class_templates(10, 12)
    with pytest.raises(ValueError, match=r"\(N, 4, h, w\)"):
        latent_to_rgb(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="share"):
        nearest_class(torch.zeros(2, 4, 8, 8), torch.zeros(10, 4, 16, 16))


def test_dataloader_batches():
    loader = torch.utils.data.DataLoader(SyntheticDataset(num_samples=20), batch_size=8)
    x, y = next(iter(loader))
    assert x.shape == (8, 4, 8, 8) and y.tolist() == list(range(8))


def test_every_shape_renders_differently_at_high_resolution():
    """At 256px (a 32x32 latent) even classes sharing both colours differ by their shape."""
    _, fg, bg = class_attributes(torch.arange(MAX_CLASSES))
    same_colours = ((fg == 0) & (bg == 0)).nonzero().flatten()  # red on black, one class per shape
    assert len(same_colours) == 10
    templates = render_templates(same_colours, 256)
    assert torch.equal(render_templates(same_colours, 64), class_templates(MAX_CLASSES, 64)[same_colours])
    for a, b in itertools.combinations(range(10), 2):
        assert (templates[a] - templates[b]).norm() > 3.0
