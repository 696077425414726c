"""The reference DiT: configs, official key names, init, conditioning variants, CFG, checkpoint loading."""
import argparse

import pytest
import torch

from dit_fast import DIT_CONFIGS, create_model, get_config, load_model
from dit_fast.embeddings import PatchEmbed, sincos_2d
from dit_fast.model import BLOCK_CLASSES
from tests.official_forward import official_forward
from tests.random_weights import randomize

PAPER_MODELS = [n for n in DIT_CONFIGS if n != "DiT-debug"]


def inputs(cfg, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, cfg.num_classes, (n,), generator=gen)
    return x, t, y


def test_configs_have_paper_sizes():
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert len(PAPER_MODELS) == 12
    for name in PAPER_MODELS:
        cfg = DIT_CONFIGS[name]
        size, patch = name[4:].split("/")
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == expected[size]
        assert cfg.patch_size == int(patch) and cfg.input_size == 32 and cfg.num_classes == 1000
        assert (cfg.mlp_ratio, cfg.in_channels, cfg.learn_sigma, cfg.class_dropout_prob) == (4.0, 4, True, 0.1)
    assert get_config("DiT-XL/2", image_size=512).input_size == 64


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-XXL/2'; choose one of DiT-S/2, .*DiT-XL/8"):
        get_config("DiT-XXL/2")


@pytest.mark.parametrize("image_size", [250, 100, 0, -16])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match=f"image size {image_size} must be a positive multiple of 16"):
        create_model("DiT-S/2", image_size=image_size)


def test_unknown_block():
    with pytest.raises(ValueError, match="unknown block 'film'; choose one of adaLN-Zero, adaLN"):
        create_model("DiT-debug", block="film")


def test_xl2_parameter_count_meta():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    assert sum(p.numel() for p in model.state_dict().values()) == 675_129_632


def test_official_key_names():
    keys = set(create_model("DiT-S/8").state_dict())
    for key in [
        "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
        "blocks.11.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight",
    ]:
        assert key in keys, key
    assert create_model("DiT-S/8").state_dict()["y_embedder.embedding_table.weight"].shape == (1001, 384)


def test_matches_independent_official_forward():
    model = randomize(create_model("DiT-debug")).eval()
    cfg = model.cfg
    x, t, y = inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = official_forward(model.state_dict(), x, t, y, cfg.num_heads, cfg.patch_size)
    assert ours.shape == (3, 8, 8, 8)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_pos_embed_is_fixed_sincos():
    model = create_model("DiT-S/4")
    assert not model.pos_embed.requires_grad
    table = sincos_2d(384, 8)
    # Token (row 0, col 1): first half encodes the column (sin(1*omega_0) = sin 1), second half the row (0).
    assert table[1, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert table[1, 192].item() == 0.0 and table[8, 192].item() == pytest.approx(0.8414709848)
    torch.testing.assert_close(model.pos_embed[0], table.float())


def test_adaln_zero_blocks_are_identity_at_init():
    model = create_model("DiT-debug")
    x = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = model(*inputs(model.cfg, n=2))
    assert torch.count_nonzero(out) == 0  # zero final layer


def test_init_statistics():
    model = create_model("DiT-B/4")
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    qkv = model.blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5
    assert qkv.abs().max().item() <= bound and qkv.abs().max().item() > 0.9 * bound
    assert torch.count_nonzero(model.blocks[3].adaLN_modulation[1].weight) == 0


@pytest.mark.parametrize("block", list(BLOCK_CLASSES))
def test_variants_forward_backward(block):
    model = randomize(create_model("DiT-debug", block=block)).train()
    x, t, y = inputs(model.cfg)
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["y_embedder.embedding_table.weight"].abs().sum() > 0  # conditioning reaches the output


def test_variants_condition_on_label():
    for block in BLOCK_CLASSES:
        model = randomize(create_model("DiT-debug", block=block)).eval()
        x, t, _ = inputs(model.cfg, n=2)
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
        assert (a - b).abs().max() > 1e-4, block


def test_label_dropout_uses_null_class():
    model = create_model("DiT-debug")
    emb = model.y_embedder
    labels = torch.arange(6)
    dropped = emb.drop_labels(labels, force_drop_ids=torch.tensor([1, 0, 1, 0, 0, 1]))
    assert dropped.tolist() == [10, 1, 10, 3, 4, 10]
    torch.manual_seed(0)
    many = emb.drop_labels(torch.zeros(20000, dtype=torch.long))
    assert (many == 10).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_null_label_accepted_in_forward():
    model = randomize(create_model("DiT-debug")).eval()
    x, t, _ = inputs(model.cfg, n=2)
    out = model(x, t, torch.tensor([3, model.num_classes]))
    assert torch.isfinite(out).all()


def test_cfg_channels_three_vs_all():
    model = randomize(create_model("DiT-debug")).eval()
    x, t, y = inputs(model.cfg, n=4)
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
        g3 = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=3)
        gall = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels="all")
    cond, uncond = raw[:2], raw[2:]
    guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(g3[:2, :3], guided[:, :3])
    torch.testing.assert_close(g3[:2, 3:4], cond[:, 3:4])  # channel 3 left unguided, as the official code
    torch.testing.assert_close(gall[:2, :4], guided[:, :4])
    torch.testing.assert_close(gall[2:, :4], gall[:2, :4])
    torch.testing.assert_close(g3[:, 4:], raw[:, 4:])  # variance channels pass through
    with pytest.raises(ValueError, match="cfg_channels 2 is not valid"):
        model.forward_with_cfg(x, t, y, 4.0, cfg_channels=2)


def test_state_dict_round_trip(tmp_path):
    model = randomize(create_model("DiT-debug"))
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model("DiT-debug", path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_load_training_checkpoint_takes_ema(tmp_path):
    model, ema = randomize(create_model("DiT-debug"), 1), randomize(create_model("DiT-debug"), 2)
    path = tmp_path / "0001000.pt"
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, path)
    loaded = load_model("DiT-debug", path)
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)


def test_load_infers_and_checks_image_size(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("DiT-S/8", image_size=512).state_dict(), path)
    assert load_model("DiT-S/8", path).cfg.input_size == 64
    with pytest.raises(ValueError, match=r"image size 256 does not match .* implies 512px"):
        load_model("DiT-S/8", path, image_size=256)


def test_load_wrong_model_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("DiT-S/8").state_dict(), path)
    with pytest.raises(ValueError) as err:
        load_model("DiT-B/8", path)
    message = str(err.value)
    assert "looks like DiT-S/8 (depth 12, width 384, patch 8) at 256px" in message
    assert "shape mismatches: blocks.0.adaLN_modulation.1.bias: checkpoint (2304,) vs model (4608,)" in message
    state = create_model("DiT-debug").state_dict()
    state.pop("final_layer.linear.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: final_layer.linear.bias[\s\S]*unexpected keys: extra.weight"):
        load_model("DiT-debug", path)


def test_load_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("DiT-debug", tmp_path / "nope.pt")
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_model("DiT-debug", path)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_patch_embed_as_matmul_equals_convolution(patch):
    """The fast path's unfold-and-matmul patch embedding is the convolution's map (values and gradients) but
    returns contiguous tokens."""
    torch.manual_seed(patch)
    conv = PatchEmbed(patch, 4, 24)
    torch.nn.init.normal_(conv.proj.bias)
    matmul = PatchEmbed(patch, 4, 24, as_matmul=True)
    matmul.load_state_dict(conv.state_dict())
    x = torch.randn(3, 4, 16, 16, requires_grad=True)
    expected, got = conv(x), matmul(x)
    assert got.shape == (3, (16 // patch) ** 2, 24) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn_like(got)
    grads = [torch.autograd.grad(m(x), [x, *m.parameters()], cotangent) for m in (conv, matmul)]
    for g_conv, g_matmul in zip(*grads):
        torch.testing.assert_close(g_matmul, g_conv, rtol=1e-5, atol=1e-5)
