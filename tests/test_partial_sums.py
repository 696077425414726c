"""sum_chunks (kernels/partial_sums.py) against an fp64 sum of the same partial buffers, with fresh random inputs."""
import pytest
import torch

from dit_fast.kernels.partial_sums import sum_chunks


def make_parts(count: int, G: int, n_chunks: int, D: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """`count` buffers of per-chunk partial sums, each group and column on its own scale (so a mix-up shows)."""
    scales = 1.0 + torch.arange(G * D, dtype=dtype, device=device).view(G, 1, D) % 17
    return [torch.randn(G, n_chunks, D, dtype=dtype, device=device) * scales for _ in range(count)]


# (buffers, G, n_chunks, D): one chunk; a chunk axis longer than a tile (several loop steps, a ragged last
# tile); a ragged column block; bias_gelu's single group with many chunks.
CASES = [(1, 3, 1, 72), (2, 4, 37, 1000), (3, 5, 8, 1152), (1, 1, 300, 200), (3, 2, 3, 7)]


@pytest.mark.parametrize("count,G,n_chunks,D", CASES, ids=[f"{c}x{g}x{n}x{d}" for c, g, n, d in CASES])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sums_match_an_fp64_sum(count, G, n_chunks, D, out_dtype, device):
    """Each output is its own buffer's sum over chunks, rounded once to the output dtype."""
    parts = make_parts(count, G, n_chunks, D, torch.float32, device)
    outs = sum_chunks(parts, out_dtype)
    assert len(outs) == count
    for part, out in zip(parts, outs, strict=True):
        assert out.shape == (G, D) and out.dtype == out_dtype
        exact = part.double().sum(1)  # (G, D)
        # fp32 accumulation over n_chunks terms, then one rounding to out_dtype
        bound = n_chunks * torch.finfo(torch.float32).eps * part.double().abs().sum(1)
        bound += torch.finfo(out_dtype).eps * exact.abs() + 1e-30
        assert torch.all((out.double() - exact).abs() <= bound), f"max error {(out.double() - exact).abs().max()}"


def test_fp64_buffers_stay_fp64(device):
    """fp64 partials (the gradcheck path) are summed in fp64."""
    (part,) = make_parts(1, 2, 5, 9, torch.float64, device)
    (out,) = sum_chunks([part], torch.float64)
    assert out.dtype == torch.float64
    # fp64 accumulation (any order): within 5 * 2^-52 of the summed magnitudes; fp32 would miss by ~1e-7
    bound = 5 * torch.finfo(torch.float64).eps * part.abs().sum(1)
    assert torch.all((out - part.sum(1)).abs() <= bound)


def test_is_deterministic(device):
    """Two calls on the same buffers give bit-identical sums (fixed order, no atomics)."""
    parts = make_parts(3, 4, 37, 300, torch.float32, device)
    for first, second in zip(sum_chunks(parts, torch.float32), sum_chunks(parts, torch.float32), strict=True):
        assert torch.equal(first, second)


def test_empty_buffers_sum_to_zero(device):
    (out,) = sum_chunks([torch.empty(2, 0, 5, device=device)], torch.float32)
    assert torch.equal(out, torch.zeros(2, 5, device=device))


def test_bad_buffers_are_rejected(device):
    part = torch.zeros(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="1 to 3 buffers; got 4"):
        sum_chunks([part] * 4, torch.float32)
    with pytest.raises(ValueError, match="one shape and dtype"):
        sum_chunks([part, torch.zeros(2, 3, 5, device=device)], torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        sum_chunks([part.transpose(0, 1)], torch.float32)
