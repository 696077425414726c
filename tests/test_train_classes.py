"""--num-classes in dit_fast.train: the label embedding, the synthetic labels, the sample grid, export and
load_model, the dataset and resume checks (DiT-debug on the CPU, in-process, a few steps)."""

import json

import pytest
import torch
from PIL import Image

from dit_fast.checkpoint import load_model
from dit_fast.export import read_ema_state, write_state_dict
from dit_fast.parallel import DistEnv
from dit_fast.train import build_parser, fill_model_defaults, main
from dit_fast.train_data import make_data_source
from dit_fast.train_hooks import TrainHooks
from dit_fast.train_state import latest_checkpoint
from tests.test_extract import IMAGE_SIZE, FakeEncoder, run_extract, write_image
from tests.test_train import error_of
from tests.test_train_state import BASE_ARGS, RUN

DEBUG_WIDTH = 64  # DiT-debug's hidden size: the label embedding table is (num_classes + 1, 64)


def parsed(argv: list[str]):
    args = build_parser().parse_args(argv)
    fill_model_defaults(args)
    return args


def test_num_classes_defaults_to_the_model_config():
    assert parsed(["--model", "DiT-XL/2"]).num_classes == 1000  # ImageNet, as in the paper
    assert parsed(["--model", "DiT-debug"]).num_classes == 10
    assert parsed(["--model", "DiT-S/4", "--num-classes", "10"]).num_classes == 10


def test_num_classes_reaches_the_model_the_grid_the_export_and_load_model(tmp_path):
    seen = {}

    def capture(objects) -> None:
        seen["table"] = tuple(objects.model.y_embedder.embedding_table.weight.shape)  # the global (DTensor) shape
        seen["null_class"] = objects.model.y_embedder.num_classes

    argv = BASE_ARGS + ["--num-classes", "3", "--max-steps", "2", "--ckpt-every", "2", "--sample-every", "2"]
    main(argv + ["--results-dir", str(tmp_path)], hooks=TrainHooks(on_finish=capture))
    assert seen == {"table": (3 + 1, DEBUG_WIDTH), "null_class": 3}
    trainer = json.loads((tmp_path / RUN / "checkpoints" / "0000002" / "trainer.json").read_text())
    assert trainer["num_classes"] == 3 and trainer["args"]["num_classes"] == 3
    with Image.open(tmp_path / RUN / "samples" / "0000002.png") as grid:  # 3 classes x 4 samples of 64px
        assert grid.size == (3 * 66 + 2, 4 * 66 + 2)

    state, saved = read_ema_state(tmp_path / RUN)
    assert saved["num_classes"] == 3 and state["y_embedder.embedding_table.weight"].shape == (4, DEBUG_WIDTH)
    exported = write_state_dict(state, tmp_path / "ema.pt")
    model = load_model("DiT-debug", exported)  # the class count comes from the table
    assert model.num_classes == 3 and model.y_embedder.embedding_table.weight.shape == (4, DEBUG_WIDTH)
    with pytest.raises(ValueError, match=r"num_classes 10 does not match .* \(4 rows\) implies 3 classes"):
        load_model("DiT-debug", exported, num_classes=10)


def test_synthetic_data_draws_only_labels_below_num_classes():
    args = parsed(["--model", "DiT-debug", "--num-classes", "3", "--synthetic-size", "30"])
    source = make_data_source(args, DistEnv(0, 1, 0, torch.device("cpu")), TrainHooks())
    _, labels = source.dataset.get_batch(list(range(30)))
    assert sorted(set(labels.tolist())) == [0, 1, 2]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0", "--num-classes must be positive, got 0"),
        ("-2", "--num-classes must be positive, got -2"),
        ("1001", "--num-classes 1001 is more than the synthetic dataset's 1000 classes"),
        ("ten", "argument --num-classes: invalid int value: 'ten'"),
    ],
)
def test_bad_num_classes_are_named(value, expected, capsys, tmp_path):
    argv = ["--model", "DiT-debug", "--num-classes", value, "--results-dir", str(tmp_path)]
    assert expected in error_of(argv, capsys)


def test_datasets_with_more_classes_than_num_classes_are_refused(tmp_path, capsys):
    images = tmp_path / "images"
    for c, name in enumerate(("cat", "dog", "eel")):
        (images / name).mkdir(parents=True)
        for i in range(2):
            write_image(images / name / f"{i}.png", 40, 36, seed=10 * c + i)
    run_extract(images, tmp_path / "latents", FakeEncoder())
    argv = ["--model", "DiT-debug", "--image-size", str(IMAGE_SIZE), "--num-classes", "2", "--num-workers", "0",
            "--global-batch-size", "2", "--results-dir", str(tmp_path / "runs")]  # fmt: skip
    for flag, path in (("--latents", tmp_path / "latents"), ("--data-path", images)):
        assert (
            f"{flag} '{path}' has 3 classes, so labels up to 2, but --num-classes 2 takes labels in [0, 2); "
            "pass --num-classes 3 (or more)"
        ) in error_of(argv + [flag, str(path)], capsys)


def test_resume_with_another_num_classes_is_refused(tmp_path, capsys):
    argv = BASE_ARGS + ["--max-steps", "1", "--results-dir", str(tmp_path)]
    main(argv)  # DiT-debug's own 10 classes
    assert "belongs to a different run (num_classes 10 -> 5)" in error_of(argv + ["--num-classes", "5"], capsys)
    trainer = tmp_path / RUN / "checkpoints" / "0000001" / "trainer.json"
    state = json.loads(trainer.read_text())
    del state["num_classes"]  # as written before --num-classes existed: the config's count is assumed
    trainer.write_text(json.dumps(state))
    main(BASE_ARGS + ["--max-steps", "2", "--results-dir", str(tmp_path)])
    assert latest_checkpoint(tmp_path / RUN / "checkpoints").name == "0000002"
