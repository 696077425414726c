"""Models with every weight random: the paper's init zeroes the adaLN-Zero gates and the final layer, which
makes the body an identity and the output zero, so tests that compare paths fill the weights first."""
import torch


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter but the fixed pos_embed with N(0, std^2) values from a CPU generator seeded `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
