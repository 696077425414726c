"""dit_fast.train on the CPU: command-line errors, the EMA, the data order and step randomness, the
non-finite stop, and that DiT-debug learns the embedded dataset (in-process, one gloo rank)."""

import importlib
from itertools import chain

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dit_fast.data import class_templates, nearest_class
from dit_fast.diffusion import create_diffusion
from dit_fast.ema import ShardedEMA
from dit_fast.export import read_ema_state
from dit_fast.model import create_model
from dit_fast.parallel import DistEnv, build_fsdp_model, distributed, local_tensor
from dit_fast.pipeline import Pipeline
from dit_fast.train import build_parser, check_args, fill_model_defaults, main
from dit_fast.train_data import DataPosition, GlobalBatchSampler, draw_step_randomness, next_position
from dit_fast.train_errors import UsageError
from dit_fast.train_hooks import TrainHooks
from dit_fast.train_state import latest_checkpoint
from dit_fast.train_step import TrainStep, make_optimizer
from tests.test_train_state import BASE_ARGS, RUN, checkpoint_tensors, metrics

CPU = torch.device("cpu")


def error_of(argv: list[str], capsys) -> str:
    """The message main() exits with (status 2, argparse style) for bad arguments."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "DiT-XXL/2"], "invalid choice: 'DiT-XXL/2'"),
        (
            ["--model", "DiT-S/2", "--image-size", "300"],
            "image size 300 is not valid for DiT-S/2; choose one of 256, 512",
        ),
        (["--model", "DiT-debug", "--image-size", "40"], "multiple of 16"),
        (
            ["--model", "DiT-debug", "--data-path", "/no/such/folder"],
            "--data-path '/no/such/folder' is not a directory",
        ),
        (["--model", "DiT-debug", "--latents", "/no/such/folder"], "is not a latent directory"),
        (["--model", "DiT-debug", "--resume", "/no/such/ckpt"], "is not a complete checkpoint directory"),
        (["--model", "DiT-debug", "--global-batch-size", "0"], "--global-batch-size 0 must be a positive multiple"),
        (["--model", "DiT-debug", "--lr", "-1"], "--lr must be positive"),
        (["--model", "DiT-debug", "--resume", "x", "--no-resume"], "not allowed with argument"),
    ],
)
def test_bad_arguments_are_named(argv, expected, capsys, tmp_path):
    assert expected in error_of(argv + ["--results-dir", str(tmp_path)], capsys)


@pytest.mark.parametrize(
    "flags, module, expected",
    [
        (["--optimizer", "apex"], "apex.optimizers", "--optimizer apex needs apex.optimizers"),
        (["--tensorboard"], "torch.utils.tensorboard", "--tensorboard needs torch.utils.tensorboard"),
    ],
)
def test_missing_optional_packages_are_named(flags, module, expected, capsys, tmp_path):
    try:
        importlib.import_module(module)
        pytest.skip(f"{module} is installed here")
    except ImportError:
        pass
    assert expected in error_of(["--model", "DiT-debug", *flags, "--results-dir", str(tmp_path)], capsys)


def test_global_batch_must_split_over_ranks():
    args = build_parser().parse_args(["--model", "DiT-debug", "--global-batch-size", "256"])
    fill_model_defaults(args)
    with pytest.raises(UsageError, match="--global-batch-size 256 must be a positive multiple of the world size 3"):
        check_args(args, world_size=3)
    check_args(args, world_size=4)


def test_no_resume_refuses_a_run_with_checkpoints(capsys, tmp_path):
    argv = BASE_ARGS + ["--max-steps", "1", "--results-dir", str(tmp_path)]
    main(argv)
    assert "already has checkpoints (latest 0000001)" in error_of(argv + ["--no-resume"], capsys)


def test_resume_refuses_a_checkpoint_of_another_run(capsys, tmp_path):
    argv = BASE_ARGS + ["--max-steps", "2", "--results-dir", str(tmp_path)]
    main(argv)
    argv[argv.index("--global-batch-size") + 1] = "16"
    assert "belongs to a different run (global_batch_size 8 -> 16)" in error_of(argv, capsys)


# ---- EMA -----------------------------------------------------------------------------------------------


def test_ema_starts_as_the_model_and_decay_zero_copies_exactly():
    model = create_model("DiT-debug")
    ema = ShardedEMA(model, decay=0.9999)
    for name, param in model.named_parameters():
        assert torch.equal(ema.state_dict()[name], param)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    ema.update(decay=0.0)
    for name, param in model.named_parameters():
        assert torch.equal(ema.state_dict()[name], param)


def test_ema_foreach_lerp_matches_the_per_parameter_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    decay = 0.9
    ema = ShardedEMA(model, decay)
    loop = [param.detach().clone() for param in model.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.update()
        for shadow, param in zip(loop, model.parameters()):
            shadow.mul_(decay).add_(param.detach(), alpha=1 - decay)
    for shadow, mine in zip(loop, ema.shadow):
        torch.testing.assert_close(mine, shadow, rtol=1e-6, atol=1e-6)


def test_sharded_ema_follows_the_optimizers_in_place_updates():
    with distributed() as env:
        model = build_fsdp_model("DiT-debug", env, seed=0, attn="sdpa")
        ema = ShardedEMA(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
        (model(x, t, y) - 1).square().mean().backward()  # not zero at the zero-initialised output
        optimizer.step()
        ema.update(decay=0.0)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        ema_full = ema.full_state_dict()
    assert full.keys() == ema_full.keys()
    assert not torch.equal(full["final_layer.linear.weight"], torch.zeros_like(full["final_layer.linear.weight"]))
    for name in full:
        assert torch.equal(ema_full[name], full[name]), name


def test_one_fsdp_unit_keeps_the_hoisted_fast_path_and_computes_what_block_units_do():
    """With one rank the default unit is the whole model, so the fused adaLN-Zero model keeps its hoisted adaLN
    product and norms chained across blocks; per-block units cannot. Same weights (perturbed away from the
    zero init, so every block gets gradients): same loss and gradients, to bf16 rounding."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3, 500]), torch.tensor([1, 2])
    outcomes = {}
    with distributed() as env:
        x, t, y = (tensor.to(env.device) for tensor in inputs)
        for units in ("auto", "block"):
            model = build_fsdp_model("DiT-debug", env, seed=0, attn="sdpa", fused=True, units=units)
            perturb = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for param in model.parameters():
                    shard = local_tensor(param)
                    shard.add_(0.05 * torch.randn(shard.shape, generator=perturb).to(shard.device))
            loss = (model(x, t, y) - 1).square().mean()
            loss.backward()
            grads = [local_tensor(p.grad).clone() for p in model.parameters() if p.requires_grad]
            outcomes[units] = (model.hoist_modulation, loss.item(), grads)
    (hoisted, loss, grads), (block_hoisted, block_loss, block_grads) = outcomes["auto"], outcomes["block"]
    assert hoisted and not block_hoisted
    assert loss == pytest.approx(block_loss, rel=1e-2)
    assert all(g.norm() > 0 for g in block_grads)
    for mine, theirs in zip(grads, block_grads):
        assert ((mine - theirs).norm() / theirs.norm()).item() < 3e-2


def test_unknown_fsdp_units_are_named():
    with distributed() as env, pytest.raises(ValueError, match="unknown FSDP units 'layer'; choose one of auto, block"):
        build_fsdp_model("DiT-debug", env, seed=0, attn="sdpa", units="layer")


# ---- activation checkpointing and compile -------------------------------------------------------------


def run_variant(tmp_path, name: str, *flags: str) -> dict[str, torch.Tensor]:
    main(BASE_ARGS + ["--max-steps", "3", "--ckpt-every", "3", "--results-dir", str(tmp_path / name), *flags])
    return checkpoint_tensors(tmp_path / name / RUN / "checkpoints" / "0000003", tmp_path)


def test_activation_checkpointing_changes_nothing(tmp_path):
    """Same losses and bitwise the same checkpoint, under the official key names."""
    plain, checkpointed = run_variant(tmp_path, "plain"), run_variant(tmp_path, "ckpt", "--grad-ckpt")
    assert plain.keys() == checkpointed.keys() and not any("_checkpoint_wrapped" in key for key in plain)
    assert all(torch.equal(plain[key], checkpointed[key]) for key in plain)


@pytest.mark.full
def test_compiled_blocks_train_the_same(tmp_path):
    """Per-block torch.compile (with activation checkpointing) on the CPU, about 20 s of compilation: Inductor
    fuses the bf16 elementwise work differently, so the losses agree to 1e-3, not bitwise."""
    plain, compiled = run_variant(tmp_path, "plain"), run_variant(tmp_path, "compiled", "--compile", "--grad-ckpt")
    assert plain.keys() == compiled.keys()
    compiled_losses = [loss for _, loss, _ in metrics(tmp_path / "compiled")]
    assert compiled_losses == pytest.approx([loss for _, loss, _ in metrics(tmp_path / "plain")], rel=1e-3)


def test_clipping_scales_the_update_to_the_max_grad_norm():
    with distributed() as env:
        model = build_fsdp_model("DiT-debug", env, seed=0, attn="sdpa")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1.0)  # the update is minus the (clipped) gradient
        before = [p.detach().full_tensor().clone() for p in params]
        generator = torch.Generator().manual_seed(0)
        x, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
        t, y = torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 3])
        trainer = TrainStep(model, create_diffusion(""), optimizer, ShardedEMA(model), max_grad_norm=None)
        stats = trainer.gradients(x, y, t, noise, torch.zeros(4, dtype=torch.bool))
        full_norm = torch.stack([p.grad.full_tensor().norm() for p in params]).norm()
        torch.testing.assert_close(stats.grad_norm, full_norm)
        trainer.max_grad_norm = 0.1 * stats.grad_norm.item()
        trainer.update(stats, 1)
        moved = torch.stack([(p.detach().full_tensor() - b).norm() for p, b in zip(params, before)]).norm()
    torch.testing.assert_close(moved, torch.tensor(trainer.max_grad_norm), rtol=1e-4, atol=0)


@pytest.mark.parametrize("optimizer_name", ["fused-adamw", "sgd"])
def test_updates_are_skipped_from_the_first_non_finite_step_on(optimizer_name):
    """Fused AdamW skips on the device (found_inf) with no host read; an optimizer without found_inf (SGD here,
    apex's FusedAdam in train.py) has the record read before it runs. Either way nothing moves after step 2."""
    with distributed() as env:
        model = build_fsdp_model("DiT-debug", env, seed=0, attn="sdpa")
        params = [p for p in model.parameters() if p.requires_grad]
        fused = optimizer_name == "fused-adamw"
        optimizer = make_optimizer("adamw", params, 1e-3) if fused else torch.optim.SGD(params, lr=1e-3)
        ema = ShardedEMA(model, decay=0.9)
        trainer = TrainStep(model, create_diffusion(""), optimizer, ema)
        assert trainer.skips_on_device == fused
        generator = torch.Generator().manual_seed(0)
        x, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
        t, y, keep = torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.bool)

        def state() -> list[torch.Tensor]:
            tensors = [p.detach().full_tensor().clone() for p in params]
            tensors += [v.full_tensor().clone() for v in ema.state_dict().values()]
            tensors += [v.full_tensor().clone() for s in optimizer.state.values() for v in s.values() if v.dim()]
            return tensors

        initial = [p.detach().full_tensor().clone() for p in params]
        for step in (1, 2):
            trainer.update(trainer.gradients(x, y, t, noise, keep), step)
        assert trainer.first_non_finite() is None
        after_two = state()
        assert any(not torch.equal(now, then) for now, then in zip(after_two, initial))  # good steps do update
        trainer.update(trainer.gradients(x * float("nan"), y, t, noise, keep), 3)
        trainer.update(trainer.gradients(x, y, t, noise, keep), 4)  # finite again, but the run is halted
        bad = trainer.first_non_finite()
        assert bad is not None and bad.step == 3 and bad.loss != bad.loss  # NaN loss recorded at step 3
        for now, then in zip(state(), after_two, strict=True):
            assert torch.equal(now, then)
        if fused:
            assert all(int(s["step"]) == 2 for s in optimizer.state.values())  # skipped steps are not counted


# ---- data order and step randomness -------------------------------------------------------------------


def test_global_batches_do_not_depend_on_the_world_size():
    def epoch_batches(world_size: int, start: DataPosition) -> list[list[int]]:
        per_rank = []
        for rank in range(world_size):
            sampler = GlobalBatchSampler(40, 8, DistEnv(rank, world_size, rank, CPU), seed=3)
            sampler.set_position(start)
            per_rank.append(list(sampler))
        return [list(chain(*parts)) for parts in zip(*per_rank)]  # rank slices side by side

    one = epoch_batches(1, DataPosition(1, 0))
    assert epoch_batches(2, DataPosition(1, 0)) == one == epoch_batches(4, DataPosition(1, 0))
    assert sorted(chain(*one)) == list(range(40))  # a permutation
    assert epoch_batches(2, DataPosition(1, 3)) == one[3:]  # resuming mid-epoch
    assert one != epoch_batches(1, DataPosition(2, 0))  # reshuffled every epoch
    assert next_position(DataPosition(1, 4), 5) == DataPosition(2, 0)


def test_step_randomness_is_sliced_from_the_global_batch():
    def draws(world_size: int) -> list:
        parts = [
            draw_step_randomness(7, 11, 8, (4, 2, 2), 1000, 0.1, DistEnv(r, world_size, r, CPU))
            for r in range(world_size)
        ]
        return [torch.cat([getattr(p, name) for p in parts]) for name in ("t", "noise", "eps", "drop_label", "flip")]

    for whole, halves in zip(draws(1), draws(2)):
        assert torch.equal(whole, halves)
    other_step = draw_step_randomness(7, 12, 8, (4, 2, 2), 1000, 0.1, DistEnv(0, 1, 0, CPU))
    assert not torch.equal(other_step.noise, draws(1)[1])


# ---- non-finite stop ----------------------------------------------------------------------------------


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    captured = {}

    def capture(objects) -> None:
        captured["model"] = get_model_state_dict(objects.model, options=StateDictOptions(full_state_dict=True))
        captured["ema"] = objects.ema.full_state_dict()
        captured["step"] = objects.step

    argv = BASE_ARGS + ["--max-steps", "6", "--ckpt-every", "2", "--log-every", "5", "--results-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="non-finite loss or gradient norm at step 3") as exit_info:
        main(argv, hooks=TrainHooks(nan_inputs_at_step=3, on_finish=capture))
    assert "stopped before the optimizer step" in str(exit_info.value.code)
    assert "training stopped at step 4" in str(exit_info.value.code)  # read with the step-4 checkpoint due
    checkpoints = tmp_path / RUN / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "0000002" and sorted(p.name for p in checkpoints.iterdir()) == [
        "0000002"
    ]
    assert captured["step"] == 2
    on_disk = checkpoint_tensors(checkpoints / "0000002", tmp_path)
    for name, tensor in captured["model"].items():
        assert torch.equal(on_disk[f"model.{name}"], tensor), name  # the NaN gradients were never applied
        assert torch.equal(on_disk[f"ema.{name}"], captured["ema"][name]), name
    assert "non-finite loss or gradient norm at step 3" in (tmp_path / RUN / "log.txt").read_text()


# ---- does it learn ------------------------------------------------------------------------------------


def sample_accuracy(run_dir, samples_per_class: int = 8) -> float:
    """Fraction of DDIM-50 EMA samples (CFG 4) that the nearest class template recognises as their class."""
    state, _ = read_ema_state(run_dir)
    model = create_model("DiT-debug", attn="sdpa")
    model.load_state_dict(state)
    labels = list(range(model.num_classes)) * samples_per_class
    latents = Pipeline(model, device="cpu")(
        labels, guidance_scale=4.0, num_inference_steps=50, sampler="ddim",
        generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
    )  # fmt: skip
    templates = class_templates(model.num_classes, 64)
    return (nearest_class(latents, templates) == torch.tensor(labels)).float().mean().item()


def train_debug(tmp_path, steps: int) -> None:
    main(["--model", "DiT-debug", "--global-batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.99",
          "--max-steps", str(steps), "--ckpt-every", str(steps), "--log-every", "100", "--sample-every", str(steps),
          "--num-workers", "0", "--results-dir", str(tmp_path), "--run-name", RUN])  # fmt: skip


def test_debug_model_learns_the_classes(tmp_path):
    """1000 steps (about 45 s on one core): well above the 10% of chance (about 80% measured)."""
    train_debug(tmp_path, 1000)
    assert (tmp_path / RUN / "samples" / "0001000.png").is_file()
    assert sample_accuracy(tmp_path / RUN) >= 0.6


@pytest.mark.full
def test_debug_model_learns_the_classes_well(tmp_path):
    train_debug(tmp_path, 3000)
    assert sample_accuracy(tmp_path / RUN) >= 0.9
