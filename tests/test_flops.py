"""Analytic params/GMACs against the paper, against the model's real parameters, and against torch's FLOP counter."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_fast.config import BLOCK_TYPES, get_config
from dit_fast.flops import (
    PAPER_GMACS,
    PAPER_PARAMS,
    cost_breakdown,
    counted_flops,
    counted_forward_flops,
    forward_gmacs,
    forward_macs,
    mfu,
    model_flops,
    param_count,
    train_flops_per_image,
)
from dit_fast.model import create_model

REPO_ROOT = Path(__file__).resolve().parent.parent


def module_param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of each top-level module of a DiT, keyed as cost_breakdown keys them."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["pos_embed"] = model.pos_embed.numel()
    return counts


@pytest.mark.parametrize("model_name,block,image_size", list(PAPER_GMACS), ids=lambda v: str(v))
def test_gmacs_match_paper_within_1_percent(model_name, block, image_size):
    cfg = get_config(model_name, image_size=image_size, block=block)
    paper = PAPER_GMACS[(model_name, block, image_size)]
    assert forward_gmacs(cfg) == pytest.approx(paper, rel=0.01)


def test_xl2_params_exact():
    assert param_count(get_config("DiT-XL/2")) == PAPER_PARAMS[("DiT-XL/2", "adaLN-Zero", 256)] == 675_129_632


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("model_name", ["DiT-debug", "DiT-S/8"])
def test_params_match_real_model_per_module(model_name, block):
    model = create_model(model_name, block=block)
    analytic = {name: cost.params for name, cost in cost_breakdown(model.cfg).items()}
    assert module_param_counts(model) == analytic
    assert sum(t.numel() for t in model.state_dict().values()) == param_count(model.cfg)


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_params_match_xl2_built_on_meta(block):
    with torch.device("meta"):
        model = create_model("DiT-XL/2", block=block)
    analytic = {name: cost.params for name, cost in cost_breakdown(model.cfg).items()}
    assert module_param_counts(model) == analytic


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_flop_counter_on_real_forward_matches_analytic(block):
    torch.manual_seed(0)
    model = create_model("DiT-S/8", image_size=128, block=block, depth=3).eval()  # 4 tokens (+2 in-context)
    batch = 3
    x = torch.randn(batch, 4, 16, 16)  # (N, C, H, W)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 1000, (batch,))
    assert counted_flops(model, x, t, y) == 2 * batch * forward_macs(model.cfg)


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_flop_counter_on_xl2_matches_analytic(block):
    cfg = get_config("DiT-XL/2", block=block)
    assert counted_forward_flops(cfg, batch_size=2) == 2 * 2 * forward_macs(cfg)


def test_training_flops_and_mfu():
    cfg = get_config("DiT-XL/2")
    assert train_flops_per_image(cfg) == 3 * 2 * forward_macs(cfg)
    assert train_flops_per_image(cfg) / 1e9 == pytest.approx(712, rel=0.01)  # DESIGN.md section 2
    assert model_flops(cfg, batch_size=128, train=True) == 128 * train_flops_per_image(cfg)
    assert model_flops(cfg, batch_size=4) == 4 * 2 * forward_macs(cfg)
    assert mfu(388.5e12, 777e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak"):
        mfu(1.0, 0.0)


def test_unknown_block_is_a_clear_error():
    from dataclasses import replace

    with pytest.raises(ValueError, match="unknown block 'adaLN-One'"):
        forward_macs(replace(get_config("DiT-S/8"), block="adaLN-One"))


def test_bench_script_json():
    result = subprocess.run(
        [sys.executable, "bench/flops.py", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == len(PAPER_GMACS)
    for row in rows:
        assert {"model", "block", "image_size", "params", "gmacs", "gflops", "paper_gmacs"} <= row.keys()
        assert abs(row["gmacs"] - row["paper_gmacs"]) <= 0.01 * row["paper_gmacs"]
