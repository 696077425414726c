"""Image folders (ADM center crop), latent extraction into shards, the memory-mapped reader, and training
from --latents and from --data-path, all with a fake VAE encoder (no diffusers, no weights)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dit_fast.extract import encode_both_views, extract
from dit_fast.extract import main as extract_main
from dit_fast.image_data import ImageFolder, center_crop_adm, flip_where
from dit_fast.latent_data import LatentShards, sample_posterior, shard_name
from dit_fast.parallel import distributed
from dit_fast.train import main
from dit_fast.train_hooks import TrainHooks
from tests.test_train_state import RUN

IMAGE_SIZE = 32  # DiT-debug at 32px: 4x4 latents
CLASSES = ("cat", "dog", "eel")
IMAGES_PER_CLASS = 7


class FakeEncoder:
    """A stand-in for dit_fast.vae.VAE.encode: 8x8 cell means as the posterior mean, a positive std."""

    def __init__(self):
        self.calls = 0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        cells = F.avg_pool2d(images, 8)  # (N, 3, h, w)
        mean = torch.cat([cells, cells.mean(dim=1, keepdim=True)], dim=1)  # (N, 4, h, w)
        return mean, 0.1 + 0.05 * mean.abs()


def write_image(path, width: int, height: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 7 images of varied sizes (and a non-image file that must be ignored)."""
    root = tmp_path / "images"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            write_image(root / name / f"{i:02d}.png", 40 + 9 * i, 36 + 5 * c, seed=10 * c + i)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


# ---- image folder ---------------------------------------------------------------------------------------


def test_center_crop_halves_with_box_then_bicubic_to_the_short_side():
    gradient = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # (256, 256), brighter to the right
    image = Image.fromarray(np.stack([gradient] * 3, axis=-1))
    cropped = center_crop_adm(image, 64)  # two BOX halvings, then a BICUBIC resize by 1
    assert cropped.size == (64, 64)
    expected = image.reduce(4)  # a 4x4 box average
    assert np.abs(np.asarray(cropped, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_center_crop_keeps_the_middle_of_a_wide_image():
    pixels = np.zeros((50, 150, 3), dtype=np.uint8)
    pixels[:, 50:100] = 255  # a white middle third on black
    cropped = np.asarray(center_crop_adm(Image.fromarray(pixels), 32))
    assert cropped.shape == (32, 32, 3)
    assert cropped[:, 4:-4].min() == 255 and cropped.min() >= 200  # only the middle remains


def test_image_folder_scans_sorted_classes_and_images(image_folder):
    folder = ImageFolder(image_folder, IMAGE_SIZE)
    assert folder.classes == list(CLASSES)
    assert len(folder) == len(CLASSES) * IMAGES_PER_CLASS
    images, labels = folder.get_batch([0, 8, 20])
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2]
    assert folder.items[1][0].name == "01.png"


def test_image_folder_names_a_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolder(tmp_path / "missing", IMAGE_SIZE)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolder(tmp_path / "empty", IMAGE_SIZE)


def test_flip_where_mirrors_only_the_chosen_images():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    flipped = flip_where(images, torch.tensor([True, False]))
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])


# ---- extraction and the reader ----------------------------------------------------------------------------


def run_extract(image_folder, out, encoder, shard_size: int = 8) -> dict:
    with distributed() as env:
        return extract(str(image_folder), str(out), IMAGE_SIZE, encoder, env, "fake-vae", shard_size=shard_size,
                       batch_size=3, num_workers=0)  # fmt: skip


def test_extract_writes_both_views_and_resumes(image_folder, tmp_path):
    out = tmp_path / "latents"
    encoder = FakeEncoder()
    meta = run_extract(image_folder, out, encoder)
    assert meta["num_shards"] == 3 and meta["classes"] == list(CLASSES)
    assert json.loads((out / "meta.json").read_text())["latent_shape"] == [4, 4, 4]
    latents = LatentShards(out)
    assert len(latents) == 21 and isinstance(latents.shard(0)[0], np.memmap)
    folder = ImageFolder(image_folder, IMAGE_SIZE)
    images, labels = folder.get_batch(list(range(21)))
    moments, read_labels = latents.get_batch(list(range(21)))
    assert torch.equal(read_labels, labels)
    direct = torch.from_numpy(encode_both_views(FakeEncoder(), images))  # (21, 2, 2, 4, 4, 4)
    assert torch.equal(moments, direct)
    torch.testing.assert_close(moments[:, 1].float(), moments[:, 0].float().flip(-1), atol=2e-3, rtol=0)  # mirrors
    # resume: a lost shard and a stale partial one; only the missing shard is encoded again
    calls_for_one_shard = -(-8 // 3)
    (out / (shard_name(2) + ".tmp")).mkdir()
    for path in (out / shard_name(1)).iterdir():
        path.unlink()
    (out / shard_name(1)).rmdir()
    with pytest.raises(FileNotFoundError, match="lacks 1 of 3 shards"):
        LatentShards(out)
    again = FakeEncoder()
    run_extract(image_folder, out, again)
    assert again.calls == calls_for_one_shard
    assert torch.equal(LatentShards(out).get_batch(list(range(21)))[0], direct)
    with pytest.raises(ValueError, match="different num_shards, shard_size"):
        run_extract(image_folder, out, FakeEncoder(), shard_size=5)


def test_extract_with_the_sd_vae_architecture(image_folder, tmp_path):
    """dit_fast.vae.VAE's encode() (random weights, no download) through the same extraction."""
    pytest.importorskip("diffusers", reason="dit_fast.vae needs diffusers, which is not installed here")
    from dit_fast.vae import VAE

    run_extract(image_folder, tmp_path / "latents", VAE.random_sd())
    moments, _ = LatentShards(tmp_path / "latents").get_batch(list(range(21)))
    assert moments.shape == (21, 2, 2, 4, 4, 4) and torch.isfinite(moments.float()).all()
    assert (moments[:, :, 1] > 0).all()  # posterior std
    assert not torch.equal(moments[:, 0], moments[:, 1])  # the mirror image has its own posterior


def test_extract_cli_names_a_missing_vae(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract_main(["--data-path", str(image_folder), "--out", str(tmp_path / "latents"), "--vae", "/no/such/vae"])
    assert exit_info.value.code == 2
    assert "--vae '/no/such/vae'" in capsys.readouterr().err


def test_reader_returns_items_in_the_asked_order(image_folder, tmp_path):
    run_extract(image_folder, tmp_path / "latents", FakeEncoder())
    latents = LatentShards(tmp_path / "latents")
    order = [20, 3, 9, 3, 0]
    moments, labels = latents.get_batch(order)
    for row, index in enumerate(order):
        item, label = latents[index]
        assert torch.equal(moments[row], item) and labels[row] == label
    with pytest.raises(IndexError):
        latents.get_batch([21])


def test_posterior_sample_uses_the_chosen_view():
    moments = torch.randn(3, 2, 2, 4, 2, 2).abs()  # (N, view, mean/std, C, h, w)
    flip = torch.tensor([False, True, True])
    eps = torch.randn(3, 4, 2, 2)
    z = sample_posterior(moments, flip, eps)
    for i in range(3):
        view = moments[i, int(flip[i])]
        torch.testing.assert_close(z[i], view[0] + view[1] * eps[i])


# ---- training from latents and from images -------------------------------------------------------------------


TRAIN_ARGS = [
    "--model", "DiT-debug", "--image-size", str(IMAGE_SIZE), "--global-batch-size", "6", "--max-steps", "4",
    "--ckpt-every", "4", "--log-every", "2", "--sample-every", "0", "--num-workers", "0", "--run-name", RUN,
]  # fmt: skip


def logged_losses(results) -> list[float]:
    return [json.loads(line)["loss"] for line in (results / RUN / "metrics.jsonl").read_text().splitlines()]


def test_training_from_latents_and_from_images(image_folder, tmp_path):
    run_extract(image_folder, tmp_path / "latents", FakeEncoder())
    main(TRAIN_ARGS + ["--latents", str(tmp_path / "latents"), "--results-dir", str(tmp_path / "from_latents")])
    from_latents = logged_losses(tmp_path / "from_latents")
    main(TRAIN_ARGS + ["--data-path", str(image_folder), "--results-dir", str(tmp_path / "from_images")],
         hooks=TrainHooks(vae=FakeEncoder()))  # fmt: skip
    from_images = logged_losses(tmp_path / "from_images")
    assert len(from_latents) == 2 and all(np.isfinite(from_latents))
    # the same samples, flips and posterior noise: equal up to the float16 storage of the shards
    np.testing.assert_allclose(from_images, from_latents, rtol=2e-3)


def test_latents_of_another_image_size_are_refused(image_folder, tmp_path, capsys):
    run_extract(image_folder, tmp_path / "latents", FakeEncoder())
    argv = TRAIN_ARGS + ["--latents", str(tmp_path / "latents"), "--results-dir", str(tmp_path)]
    argv[argv.index("--image-size") + 1] = "64"
    with pytest.raises(SystemExit):
        main(argv)
    assert "holds 32px latents, but --image-size is 64" in capsys.readouterr().err
