"""IDDPM Gaussian diffusion: schedules, respacing, forward process, posterior, hybrid loss and samplers.

Expected values are computed independently here (float64 scalars, Bayes' rule, math.erf, closed-form optimal
denoisers), never by calling the code under test a second way.
"""
import math

import pytest
import torch

from dit_fast.diffusion import (
    GaussianDiffusion,
    cosine_beta_schedule,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    linear_beta_schedule,
    space_timesteps,
)
from dit_fast.diffusion.likelihood import IMAGE_BIN_WIDTH

LN2 = math.log(2.0)


def reference_alphas_cumprod(num_steps: int = 1000) -> list[float]:
    """alpha_bar of the linear schedule, from its definition, in Python floats."""
    scale = 1000.0 / num_steps
    start, end = 1e-4 * scale, 0.02 * scale
    alphas_cumprod, product = [], 1.0
    for i in range(num_steps):
        product *= 1.0 - (start + (end - start) * i / (num_steps - 1))
        alphas_cumprod.append(product)
    return alphas_cumprod


ORIGINAL_ALPHAS_CUMPROD = torch.tensor(reference_alphas_cumprod(), dtype=torch.float64)  # (1000,)


def abar_at(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Original alpha_bar at original timesteps t, shaped to broadcast against like: (N,) -> (N, 1, ..., 1)."""
    return ORIGINAL_ALPHAS_CUMPROD[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def point_mass_model(x_star: torch.Tensor, variance_value: float):
    """The exact denoiser when all data is the single point x_star: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar).
    It reads alpha_bar at the ORIGINAL timestep, so it is only right if the diffusion maps respaced steps back."""

    def model(x, t):
        abar = abar_at(t, x)
        eps = (x - abar.sqrt() * x_star) / (1.0 - abar).sqrt()  # (N, C, H, W)
        return torch.cat([eps, torch.full_like(eps, variance_value)], dim=1)  # (N, 2C, H, W)

    return model


def gaussian_data_model(mean: float, std: float, variance_value: float):
    """The exact denoiser for data ~ N(mean, std^2) per element: eps = sqrt(1 - abar) (x_t - sqrt(abar) mean) / var_t,
    var_t = abar std^2 + 1 - abar being the variance of x_t."""

    def model(x, t):
        abar = abar_at(t, x)
        marginal_variance = abar * std**2 + 1.0 - abar
        eps = (1.0 - abar).sqrt() * (x - abar.sqrt() * mean) / marginal_variance  # (N, C, H, W)
        return torch.cat([eps, torch.full_like(eps, variance_value)], dim=1)  # (N, 2C, H, W)

    return model


class TinyConditionalNet(torch.nn.Module):
    """A small fixed conv net with a timestep and class input, returning eps and v in [-1, 1]."""

    def __init__(self, channels: int = 3, num_classes: int = 5):
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.conv = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        self.class_bias = torch.nn.Parameter(torch.randn(num_classes, 2 * channels, generator=generator))

    def forward(self, x, t, y):
        h = self.conv(x) + self.class_bias[y][:, :, None, None] + (t.float() / 1000.0)[:, None, None, None]
        eps, v = h.chunk(2, dim=1)
        return torch.cat([eps, torch.tanh(v)], dim=1)  # (N, 2C, H, W)


# ---- schedules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1000, 250])
def test_linear_schedule_endpoints_scaled_and_increasing(num_steps):
    betas = linear_beta_schedule(num_steps)
    scale = 1000.0 / num_steps
    assert betas.dtype == torch.float64 and betas.shape == (num_steps,)
    assert betas[0].item() == pytest.approx(1e-4 * scale, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02 * scale, rel=1e-12)
    assert bool((betas[1:] > betas[:-1]).all())


def test_cosine_schedule_matches_alpha_bar_and_is_capped():
    num_steps, offset = 1000, 0.008
    betas = cosine_beta_schedule(num_steps)

    def alpha_bar(u):
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    assert betas.dtype == torch.float64 and betas.shape == (num_steps,)
    assert betas[0].item() == pytest.approx(1 - alpha_bar(1 / num_steps) / alpha_bar(0), rel=1e-12)
    assert betas[500].item() == pytest.approx(1 - alpha_bar(501 / num_steps) / alpha_bar(500 / num_steps), rel=1e-12)
    assert betas[-1].item() == 0.999  # 1 - alpha_bar(1) / alpha_bar(1 - 1/T) = 1, capped
    assert bool((betas[1:] >= betas[:-1]).all()) and bool((betas <= 0.999).all())
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert alphas_cumprod[299].item() == pytest.approx(alpha_bar(300 / num_steps) / alpha_bar(0), rel=1e-10)


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'sigmoid'.*linear, cosine"):
        get_beta_schedule("sigmoid", 1000)
    with pytest.raises(ValueError, match="sigmoid"):
        create_diffusion("", noise_schedule="sigmoid")


def test_tables_are_float64():
    diffusion = create_diffusion("")
    for table in (diffusion.betas, diffusion.alphas_cumprod, diffusion.posterior_variance, diffusion.posterior_mean_coef1):
        assert table.dtype == torch.float64
    torch.testing.assert_close(diffusion.alphas_cumprod, ORIGINAL_ALPHAS_CUMPROD, rtol=1e-12, atol=0)


# ---- respacing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["250", "ddim50", "25,25", "10,20,30", "ddim1", "1", "ddim1000"])
def test_respaced_alphas_cumprod_equal_original_at_kept_steps(spec):
    diffusion = create_diffusion(spec)
    kept = diffusion.timestep_map
    assert bool((kept[1:] > kept[:-1]).all())
    torch.testing.assert_close(diffusion.alphas_cumprod, ORIGINAL_ALPHAS_CUMPROD[kept], rtol=1e-12, atol=0)


def test_respacing_step_counts_and_positions():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert create_diffusion("ddim50").num_timesteps == 50
    assert space_timesteps(1000, "ddim1") == [0]
    assert space_timesteps(1000, "") == list(range(1000))

    steps_250 = space_timesteps(1000, "250")
    assert len(steps_250) == 250 and steps_250[0] == 0 and steps_250[-1] == 999
    assert create_diffusion("250").num_timesteps == 250
    strides = [b - a for a, b in zip(steps_250, steps_250[1:])]
    assert set(strides) == {4, 5}  # 999 / 249 = 4.012, rounded

    sections = space_timesteps(1000, "25,25")
    assert len(sections) == 50
    assert sum(s < 500 for s in sections) == 25
    assert {0, 499, 500, 999} <= set(sections)


@pytest.mark.parametrize("spec", ["ddim0", "ddim1001", "1001", "0", "abc", "ddim", "25,0", "ddimx", "-5"])
def test_bad_respacing_names_spec_and_accepted_forms(spec):
    with pytest.raises(ValueError) as error:
        create_diffusion(spec)
    message = str(error.value)
    assert repr(spec) in message and "accepted forms" in message and "ddimN" in message


def test_ddim_count_without_exact_stride_suggests_neighbours():
    with pytest.raises(ValueError, match=r"'ddim300'.*ddim250 or ddim334"):
        create_diffusion("ddim300")


# ---- forward process and posterior ---------------------------------------------------------------------------


def test_q_sample_is_closed_form():
    diffusion = create_diffusion("")
    generator = torch.Generator().manual_seed(0)
    x_start = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    abar = abar_at(t, x_start)
    expected = abar.sqrt() * x_start + (1 - abar).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x_start, t, noise), expected, rtol=1e-12, atol=1e-12)
    in_float32 = diffusion.q_sample(x_start.float(), t, noise.float())  # tables are cast to the input's dtype
    assert in_float32.dtype == torch.float32
    torch.testing.assert_close(in_float32, expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["", "50"])
def test_posterior_matches_closed_form_and_bayes(spec):
    diffusion = create_diffusion(spec)
    generator = torch.Generator().manual_seed(1)
    x_start = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    x_t = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([1, diffusion.num_timesteps // 2, diffusion.num_timesteps - 1])
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)

    abar = abar_at(diffusion.timestep_map[t], x_t)
    abar_prev = abar_at(diffusion.timestep_map[t - 1], x_t)
    alpha = abar / abar_prev
    beta = 1 - alpha
    closed_mean = beta * abar_prev.sqrt() / (1 - abar) * x_start + (1 - abar_prev) * alpha.sqrt() / (1 - abar) * x_t
    closed_variance = beta * (1 - abar_prev) / (1 - abar)
    torch.testing.assert_close(mean, closed_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, closed_variance.expand_as(x_t), rtol=1e-10, atol=0)
    torch.testing.assert_close(log_variance, closed_variance.log().expand_as(x_t), rtol=1e-10, atol=0)

    for i in range(3):
        a, a_prev = abar.flatten()[i].item(), abar_prev.flatten()[i].item()
        bayes_mean, bayes_variance = bayes_posterior(x_start[i, 1, 2, 3].item(), x_t[i, 1, 2, 3].item(), a / a_prev, a_prev)
        assert mean[i, 1, 2, 3].item() == pytest.approx(bayes_mean, rel=1e-10, abs=1e-12)
        assert variance[i, 1, 2, 3].item() == pytest.approx(bayes_variance, rel=1e-10)


def test_posterior_log_variance_is_clipped_at_t0():
    diffusion = create_diffusion("")
    assert diffusion.posterior_variance[0].item() == 0.0
    assert diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(diffusion.posterior_variance[1].item()), rel=1e-12
    )


# ---- hybrid loss ---------------------------------------------------------------------------------------------


def gaussian_kl(mean1, var1, mean2, var2):
    return 0.5 * math.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / (2 * var2) - 0.5


def bayes_posterior(x0, xt, alpha, abar_prev):
    """Mean and variance of x_{t-1} given x_t and x_0, from N(sqrt(abar_prev) x0, 1 - abar_prev) times
    N(x_t; sqrt(alpha) x_{t-1}, 1 - alpha), on scalars."""
    beta = 1 - alpha
    precision = alpha / beta + 1 / (1 - abar_prev)
    return (math.sqrt(alpha) * xt / beta + math.sqrt(abar_prev) * x0 / (1 - abar_prev)) / precision, 1 / precision


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def direct_vb_nats(x0, noise, eps_hat, v, abar, abar_prev, beta_tilde_clipped):
    """One element's VLB term in nats, from the definitions: the decoder NLL of x0's bin when abar_prev = 1 (t = 0),
    else KL(q(x_{t-1} | x_t, x0) || N(model mean, model variance))."""
    alpha = abar / abar_prev
    xt = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
    x0_hat = (xt - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)
    frac = (v + 1) / 2
    model_variance = math.exp(frac * math.log(1 - alpha) + (1 - frac) * math.log(beta_tilde_clipped))
    if abar_prev == 1.0:  # the model mean at t = 0 is x0_hat itself
        std = math.sqrt(model_variance)
        upper, lower = (x0 + 1 / 255 - x0_hat) / std, (x0 - 1 / 255 - x0_hat) / std
        if x0 < -0.999:
            return -math.log(normal_cdf(upper))
        if x0 > 0.999:
            return -math.log(1 - normal_cdf(lower))
        return -math.log(normal_cdf(upper) - normal_cdf(lower))
    true_mean, true_variance = bayes_posterior(x0, xt, alpha, abar_prev)
    model_mean, _ = bayes_posterior(x0_hat, xt, alpha, abar_prev)
    return gaussian_kl(true_mean, true_variance, model_mean, model_variance)


def test_training_losses_match_direct_vlb_and_mse():
    """Respaced to 50 steps: vb is the KL (t > 0) or decoder NLL (t = 0) in bits, times 50 / 1000."""
    diffusion = create_diffusion("50")
    num_steps = diffusion.num_timesteps
    generator = torch.Generator().manual_seed(2)
    levels = torch.randint(0, 256, (4, 2, 3, 3), generator=generator)
    levels[0, 0, 0, :2] = torch.tensor([0, 255])  # both edge bins at t = 0
    x_start = levels.double() / 127.5 - 1.0  # (N, C, H, W) on the 256-level grid
    noise = torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
    eps_hat = torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
    v = torch.rand(x_start.shape, generator=generator, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 1, 20, num_steps - 1])
    seen_timesteps = []

    def model(x, model_t):
        seen_timesteps.append(model_t.clone())
        return torch.cat([eps_hat, v], dim=1)  # (N, 2C, H, W)

    terms = diffusion.training_losses(model, x_start, t, noise=noise)
    torch.testing.assert_close(seen_timesteps[0], diffusion.timestep_map[t])

    abar_kept = [ORIGINAL_ALPHAS_CUMPROD[k].item() for k in diffusion.timestep_map.tolist()]

    def beta_tilde(i):  # posterior variance of the respaced step i > 0
        return (1 - abar_kept[i] / abar_kept[i - 1]) * (1 - abar_kept[i - 1]) / (1 - abar_kept[i])

    for n, step in enumerate(t.tolist()):
        abar_prev = abar_kept[step - 1] if step > 0 else 1.0
        beta_tilde_clipped = beta_tilde(max(step, 1))
        elements = zip(*(tensor[n].flatten().tolist() for tensor in (x_start, noise, eps_hat, v)))
        vb_nats = [direct_vb_nats(x0, z, e, u, abar_kept[step], abar_prev, beta_tilde_clipped) for x0, z, e, u in elements]
        expected_vb = sum(vb_nats) / len(vb_nats) / LN2 * num_steps / 1000
        assert terms["vb"][n].item() == pytest.approx(expected_vb, rel=1e-7, abs=1e-10), f"sample {n}, step {step}"
        expected_mse = ((noise[n] - eps_hat[n]) ** 2).mean().item()
        assert terms["mse"][n].item() == pytest.approx(expected_mse, rel=1e-10)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


@pytest.mark.parametrize("z", [-6.5, -3.0, 0.5, 3.0, 6.0, 6.8, 9.0])
def test_decoder_likelihood_stays_accurate_in_the_tails_in_float32(z):
    """An interior bin whose lower edge lies z standard deviations from the mean: in float32 a naive
    cdf(upper) - cdf(lower) rounds to 0 beyond about 5.5 sigma; the expected mass uses erfc on the small side."""
    scale, x = 0.01, 0.2
    lower = z
    upper = z + IMAGE_BIN_WIDTH / scale
    mean = x - IMAGE_BIN_WIDTH / 2 - z * scale
    got = discretized_gaussian_log_likelihood(
        torch.tensor([x]), torch.tensor([mean], dtype=torch.float32), torch.tensor([math.log(scale)])
    )
    if lower > 0:  # P(lower < X <= upper) = Q(lower) - Q(upper) with Q(z) = erfc(z / sqrt 2) / 2
        mass = 0.5 * (math.erfc(lower / math.sqrt(2)) - math.erfc(upper / math.sqrt(2)))
    else:
        mass = 0.5 * (math.erfc(-upper / math.sqrt(2)) - math.erfc(-lower / math.sqrt(2)))
    expected = math.log(max(mass, 1e-12))  # the mass is floored at 1e-12 (27.6 nats), as in IDDPM
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=2e-3)


def test_vb_trains_only_variance_and_mse_only_eps():
    diffusion = create_diffusion("")
    generator = torch.Generator().manual_seed(3)
    x_start = torch.rand(3, 2, 4, 4, generator=generator) * 2 - 1
    output = torch.cat([torch.randn(3, 2, 4, 4, generator=generator), torch.rand(3, 2, 4, 4, generator=generator) * 2 - 1], 1)
    output.requires_grad_(True)
    t = torch.tensor([0, 3, 700])
    noise = torch.randn(x_start.shape, generator=generator)

    terms = diffusion.training_losses(lambda x, model_t: output * 1.0, x_start, t, noise=noise)
    vb_grad, = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    mse_grad, = torch.autograd.grad(terms["mse"].sum(), output)
    assert bool((vb_grad[:, :2] == 0).all()), "vb must not reach the eps channels"
    assert bool((vb_grad[:, 2:].abs() > 0).all()), "vb must train every variance value"
    assert bool((mse_grad[:, 2:] == 0).all()), "mse must not reach the variance channels"
    torch.testing.assert_close(mse_grad[:, :2], -2 * (noise - output[:, :2].detach()) / 32)


def test_fixed_variance_loss_is_mse():
    diffusion = create_diffusion("", learn_sigma=False)
    generator = torch.Generator().manual_seed(4)
    x_start = torch.randn(2, 3, 4, 4, generator=generator)
    eps_prediction = torch.randn(2, 3, 4, 4, generator=generator)
    noise = torch.randn(2, 3, 4, 4, generator=generator)
    terms = diffusion.training_losses(lambda x, t: eps_prediction, x_start, torch.tensor([5, 900]), noise=noise)
    torch.testing.assert_close(terms["mse"], ((noise - eps_prediction) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"])
    assert bool((terms["vb"] == 0).all())


def test_wrong_model_output_channels_is_a_clear_error():
    diffusion = create_diffusion("")
    x = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"model output has shape \(2, 4, 3, 3\), expected \(2, 8, 3, 3\)"):
        diffusion.training_losses(lambda x, t: x, x, torch.tensor([1, 2]))


# ---- samplers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["ddim10", "7", "2,3"])
def test_samplers_recover_a_single_data_point(spec):
    """With the exact denoiser for a point mass, both samplers end exactly at x*, whatever the noise."""
    diffusion = create_diffusion(spec)
    x_star = torch.tensor([0.3, -0.7, 0.05]).view(1, 3, 1, 1)
    model = point_mass_model(x_star, variance_value=-1.0)  # v = -1: the posterior variance beta_tilde
    shape = (4, 3, 2, 2)
    generator = torch.Generator().manual_seed(5)
    ddim = diffusion.ddim_sample_loop(model, shape, generator=generator, eta=0.0)
    ddpm = diffusion.p_sample_loop(model, shape, generator=generator)
    torch.testing.assert_close(ddim, x_star.expand(shape), rtol=0, atol=1e-4)
    torch.testing.assert_close(ddpm, x_star.expand(shape), rtol=0, atol=1e-4)


@pytest.mark.parametrize("spec", ["ddim10", "25"])
def test_ddim_maps_gaussian_noise_onto_gaussian_data_exactly(spec):
    """For data ~ N(m, s^2), the exact-denoiser DDIM step scales x_t - sqrt(abar_t) m by
    (sigma_prev / sigma_t) cos(theta_t), sigma_t^2 = abar_t s^2 + 1 - abar_t and theta_t the angle between
    (sqrt(abar_t) s, sqrt(1 - abar_t)) and the same at the previous step: an elementwise closed form."""
    data_mean, data_std = 0.3, 0.5
    diffusion = create_diffusion(spec)
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sample = diffusion.ddim_sample_loop(gaussian_data_model(data_mean, data_std, 0.0), noise.shape, noise=noise)

    abars = [ORIGINAL_ALPHAS_CUMPROD[k].item() for k in diffusion.timestep_map.tolist()][::-1] + [1.0]
    gain = 1.0
    for a, a_prev in zip(abars, abars[1:]):
        u, u_prev = (math.sqrt(a) * data_std, math.sqrt(1 - a)), (math.sqrt(a_prev) * data_std, math.sqrt(1 - a_prev))
        gain *= (u[0] * u_prev[0] + u[1] * u_prev[1]) / (u[0] ** 2 + u[1] ** 2)  # (sigma_prev / sigma_t) cos(theta_t)
    expected = data_mean + gain * (noise - math.sqrt(abars[0]) * data_mean)
    torch.testing.assert_close(sample, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance_value", [-1.0, 1.0])
def test_ddpm_output_has_the_exact_moments_for_gaussian_data(variance_value):
    """For data ~ N(m, s^2) and the exact denoiser, every ancestral step is x_{t-1} = g_t x_t + b_t + sigma_t z, so
    the output is Gaussian with moments propagated here in float64 (posterior by Bayes' rule). 30720 draws (kept under
    torch's intra-op parallel threshold, which is slow on a busy CPU) pin mean and std to about 0.4%."""
    data_mean, data_std = 0.3, 0.5
    diffusion = create_diffusion("50")
    sample = diffusion.p_sample_loop(
        gaussian_data_model(data_mean, data_std, variance_value), (30, 1, 32, 32), generator=torch.Generator().manual_seed(7)
    )

    abars = [ORIGINAL_ALPHAS_CUMPROD[k].item() for k in diffusion.timestep_map.tolist()][::-1] + [1.0]
    mean, variance = 0.0, 1.0  # x_T ~ N(0, I)
    for a, a_prev in zip(abars, abars[1:]):
        alpha = a / a_prev
        x0_gain = math.sqrt(a) * data_std**2 / (a * data_std**2 + 1 - a)  # x0_hat = m + x0_gain (x_t - sqrt(a) m)
        c_x0 = bayes_posterior(1.0, 0.0, alpha, a_prev)[0] if a_prev < 1 else 1.0
        c_xt = bayes_posterior(0.0, 1.0, alpha, a_prev)[0] if a_prev < 1 else 0.0
        mean = (c_x0 * x0_gain + c_xt) * mean + c_x0 * data_mean * (1 - x0_gain * math.sqrt(a))
        variance = (c_x0 * x0_gain + c_xt) ** 2 * variance
        if a_prev < 1:  # no noise on the last step
            beta_tilde = bayes_posterior(0.0, 0.0, alpha, a_prev)[1]
            variance += beta_tilde if variance_value < 0 else 1 - alpha
    assert sample.mean().item() == pytest.approx(mean, abs=0.01)
    assert sample.std().item() == pytest.approx(math.sqrt(variance), rel=0.012)
    assert abs(math.sqrt(variance) - 0.5) > 0.015  # 50 steps are visibly off N(m, s^2): the check above has teeth


def test_ddpm_with_1000_steps_reproduces_gaussian_data():
    """With all 1000 steps, ancestral sampling turns N(0, 1) into the data distribution N(0.3, 0.5^2)."""
    sample = create_diffusion("").p_sample_loop(
        gaussian_data_model(0.3, 0.5, 0.0), (16, 1, 16, 16), generator=torch.Generator().manual_seed(7)
    )
    assert sample.mean().item() == pytest.approx(0.3, abs=0.03)
    assert sample.std().item() == pytest.approx(0.5, rel=0.03)


def test_ddim_eta_one_equals_ddpm_with_posterior_variance():
    diffusion = create_diffusion("50")
    model = gaussian_data_model(-0.2, 0.7, variance_value=-1.0)
    shape = (4, 2, 3, 3)
    ddpm = diffusion.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(8))
    ddim = diffusion.ddim_sample_loop(model, shape, generator=torch.Generator().manual_seed(8), eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-5)


def test_samplers_are_deterministic_under_a_seed_and_pass_model_kwargs():
    diffusion = create_diffusion("ddim8")
    net = TinyConditionalNet()
    labels = torch.tensor([0, 3, 4])
    seen = []

    def model(x, t, y, cfg_scale):
        seen.append((t.clone(), y, cfg_scale))
        return net(x, t, y)

    shape = (3, 3, 6, 6)
    kwargs = dict(y=labels, cfg_scale=4.0)
    with torch.no_grad():
        for sampler, extra in ((diffusion.p_sample_loop, {}), (diffusion.ddim_sample_loop, {"eta": 0.5})):
            first = sampler(model, shape, model_kwargs=kwargs, generator=torch.Generator().manual_seed(9), **extra)
            again = sampler(model, shape, model_kwargs=kwargs, generator=torch.Generator().manual_seed(9), **extra)
            other = sampler(model, shape, model_kwargs=kwargs, generator=torch.Generator().manual_seed(10), **extra)
            assert first.shape == shape and bool(torch.isfinite(first).all())
            torch.testing.assert_close(first, again, rtol=0, atol=0)
            assert (first - other).abs().max().item() > 1e-2

            seen.clear()
            other_labels = sampler(model, shape, model_kwargs=dict(y=torch.tensor([1, 1, 1]), cfg_scale=4.0),
                                   generator=torch.Generator().manual_seed(9), **extra)
            assert (first - other_labels).abs().max().item() > 1e-2
            assert [step[0].tolist() for step in seen] == [[k] * 3 for k in range(875, -1, -125)]  # original steps, descending
            assert all(step[1].tolist() == [1, 1, 1] and step[2] == 4.0 for step in seen)


def test_ddim_eta_zero_depends_only_on_given_noise():
    diffusion = create_diffusion("ddim5")
    net = TinyConditionalNet(channels=2)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    kwargs = dict(y=torch.tensor([2, 0]))
    with torch.no_grad():
        first = diffusion.ddim_sample_loop(net, noise.shape, noise=noise, model_kwargs=kwargs,
                                           generator=torch.Generator().manual_seed(1))
        second = diffusion.ddim_sample_loop(net, noise.shape, noise=noise, model_kwargs=kwargs,
                                            generator=torch.Generator().manual_seed(2), progress=True)
        steps = list(diffusion.ddim_sample_loop_progressive(net, noise.shape, noise=noise, model_kwargs=kwargs))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert len(steps) == 5 and set(steps[0]) == {"sample", "pred_xstart"}
    torch.testing.assert_close(steps[-1]["sample"], first, rtol=0, atol=0)
    torch.testing.assert_close(steps[-1]["pred_xstart"], first, rtol=0, atol=0)  # the last step returns x_0 itself


def test_sampler_noise_shape_mismatch_is_a_clear_error():
    diffusion = create_diffusion("ddim5")
    with pytest.raises(ValueError, match=r"noise has shape \(2, 3\), expected the sample shape \(2, 4\)"):
        diffusion.ddim_sample_loop(lambda x, t: x, (2, 4), noise=torch.zeros(2, 3))


def test_p_mean_variance_learned_range_interpolates_log_variance():
    diffusion = create_diffusion("")
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    t = torch.tensor([0, 400])
    v = torch.tensor([-1.0, 1.0, 0.0, 0.5], dtype=torch.float64).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    out = diffusion.p_mean_variance(lambda x, model_t: torch.cat([torch.zeros_like(x), v], 1), x, t)
    for n, step in enumerate(t.tolist()):
        log_beta = math.log(diffusion.betas[step].item())
        log_beta_tilde = math.log(diffusion.posterior_variance[max(step, 1)].item())
        for (h, w), value in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [-1.0, 1.0, 0.0, 0.5]):
            frac = (value + 1) / 2
            expected = frac * log_beta + (1 - frac) * log_beta_tilde
            assert out["log_variance"][n, 0, h, w].item() == pytest.approx(expected, rel=1e-12)
            assert out["variance"][n, 0, h, w].item() == pytest.approx(math.exp(expected), rel=1e-12)
    torch.testing.assert_close(out["pred_xstart"], x / abar_at(t, x).sqrt())  # eps = 0


def test_direct_construction_validates_betas():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="timestep_map"):
        GaussianDiffusion(torch.tensor([0.1, 0.2]), timestep_map=[0, 5, 9])
