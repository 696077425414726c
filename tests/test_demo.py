"""`make demo`'s path end to end on DiT-debug: training lowers the loss, sampling writes a class grid PNG."""
import torch
from PIL import Image

from dit_fast import demo


def test_train_tiny_loss_decreases():
    torch.manual_seed(0)
    _, losses = demo.train_tiny(steps=80, batch_size=32, device=torch.device("cpu"))
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.7 * first, (first, last)


def test_main_writes_sample_grid(tmp_path, capsys):
    demo.main(["--out", str(tmp_path), "--steps", "30", "--batch-size", "16"])
    image = Image.open(tmp_path / "samples.png")
    assert image.size == (8 * 66 + 2, 5 * 66 + 2)  # 40 samples of 64px in rows of 8, 2px padding
    assert len(set(image.getdata())) > 10  # not a blank image
    out = capsys.readouterr().out
    assert "loss" in out and "recognised as their class" in out
