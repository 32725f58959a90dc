from __future__ import annotations

import pytest
import torch

from magicfuse.diffusion.schedule import (
    ddim_pairs,
    ddim_step,
    eps_loss,
    make_alphas_cumprod,
    make_ddim_schedule,
    make_schedule,
    predict_x0,
    q_sample,
    eps_from_v,
    sample_timesteps,
    v_target,
)
from magicfuse.errors import ConfigError

# ᾱ of the authors' schedule (linear β 0.00085 → 0.012 over 1000 steps), float32.
GOLDEN = {0: 0.99914998, 40: 0.95692903, 480: 0.18252324, 960: 0.00250736, 999: 0.00157896}


def test_alphas_cumprod_golden_values():
    abar = make_alphas_cumprod()
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    for t, v in GOLDEN.items():
        assert abs(abar[t].item() - v) < 5e-9, (t, abar[t].item(), v)
    assert torch.all(abar[1:] < abar[:-1])
    assert make_schedule is make_alphas_cumprod


def test_alphas_cumprod_is_not_sqrt_linear():
    # LDM's linear-in-sqrt(beta) gives 0.3037 at t=480; the authors' values say linear beta.
    assert abs(make_alphas_cumprod()[480].item() - 0.30369) > 0.1


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        make_alphas_cumprod(0)
    with pytest.raises(ConfigError):
        make_alphas_cumprod(1000, 0.02, 0.01)
    with pytest.raises(ConfigError):
        ddim_pairs(0)
    with pytest.raises(ConfigError):
        ddim_pairs(2000, 1000)


def test_ddim_pairs_exact():
    pairs = ddim_pairs(25, 1000)
    assert len(pairs) == 25
    assert pairs[0] == (960, 920)
    assert pairs[-2] == (40, 0)
    assert pairs[-1] == (0, -1)
    assert [t for t, _ in pairs] == list(range(960, -1, -40))
    for (t, tp), (t_next, _) in zip(pairs, pairs[1:]):
        assert tp == t_next
    assert ddim_pairs(1, 1000) == [(0, -1)]
    assert ddim_pairs(4, 1000) == [(750, 500), (500, 250), (250, 0), (0, -1)]


def test_ddim_schedule_tables():
    s = make_ddim_schedule(25)
    abar = make_alphas_cumprod()
    assert len(s) == 25 and s.timesteps.dtype == torch.long
    assert s.timesteps.tolist() == [t for t, _ in s.pairs]
    assert s.abar_t[0].item() == abar[960].item()
    assert s.abar_prev[0].item() == abar[920].item()
    assert s.abar_t[-1].item() == abar[0].item()
    assert s.abar_prev[-1].item() == 1.0


def test_predict_x0_inverts_q_sample():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 8, 5, 7, generator=g)
    noise = torch.randn(3, 8, 5, 7, generator=g)
    abar = make_alphas_cumprod()[torch.tensor([0, 480, 960])]  # (B,) per-sample ᾱ
    zt = q_sample(z0, noise, abar)
    torch.testing.assert_close(predict_x0(zt, noise, abar), z0, atol=2e-4, rtol=1e-4)
    # and the forward process is what eq. 3-4 says, per sample
    a1 = abar[1].item()
    torch.testing.assert_close(zt[1], a1**0.5 * z0[1] + (1 - a1) ** 0.5 * noise[1])


def test_v_target_and_eps_from_v_invert_each_other():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(3, 8, 5, 7, generator=g)
    noise = torch.randn(3, 8, 5, 7, generator=g)
    abar = make_alphas_cumprod()[torch.tensor([0, 480, 960])]
    zt = q_sample(z0, noise, abar)
    v = v_target(z0, noise, abar)
    a = abar[2].item()  # by hand for one sample: v = √ᾱ ε − √(1−ᾱ) z0
    torch.testing.assert_close(v[2], a**0.5 * noise[2] - (1 - a) ** 0.5 * z0[2])
    torch.testing.assert_close(eps_from_v(v, zt, abar), noise, atol=1e-5, rtol=1e-5)


def test_ddim_step_with_true_noise():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 8, 4, 4, generator=g)
    noise = torch.randn(2, 8, 4, 4, generator=g)
    abar = make_alphas_cumprod()
    zt = q_sample(z0, noise, abar[480])
    # to ᾱ_prev = 1: recovers x0
    torch.testing.assert_close(ddim_step(zt, noise, abar[480], torch.tensor(1.0)), z0, atol=1e-5, rtol=1e-5)
    # to an intermediate step: lands exactly on q_sample(z0, noise, ᾱ_prev)
    torch.testing.assert_close(ddim_step(zt, noise, abar[480], abar[200]), q_sample(z0, noise, abar[200]))
    # floats work as well as tensors
    torch.testing.assert_close(ddim_step(zt, noise, float(abar[480]), 1.0), z0, atol=1e-5, rtol=1e-5)


def test_ddim_step_wrong_noise_differs():
    g = torch.Generator().manual_seed(2)
    z0, noise, other = (torch.randn(1, 8, 4, 4, generator=g) for _ in range(3))
    zt = q_sample(z0, noise, 0.5)
    assert (ddim_step(zt, other, 0.5, 1.0) - z0).abs().max() > 0.1


def test_eps_loss():
    g = torch.Generator().manual_seed(3)
    n = torch.randn(2, 8, 3, 3, generator=g)
    assert eps_loss(n.clone(), n).item() == 0.0
    assert eps_loss(n + 1.0, n).item() == pytest.approx(1.0)
    assert eps_loss(n.bfloat16(), n).dtype == torch.float32
    with pytest.raises(ValueError):
        eps_loss(n[:1], n)


def test_sample_timesteps_seeded():
    a = sample_timesteps(64, torch.Generator().manual_seed(5))
    b = sample_timesteps(64, torch.Generator().manual_seed(5))
    c = sample_timesteps(64, torch.Generator().manual_seed(6))
    assert a.dtype == torch.long and a.shape == (64,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 1000
    assert int(sample_timesteps(1000, torch.Generator().manual_seed(0), num_train_steps=10).max()) == 9


@pytest.mark.parametrize("density, mean, below_half", [("uniform", 0.5, 0.5), ("linear", 2 / 3, 0.25)])
def test_sample_timesteps_density(density, mean, below_half):
    # linear: t = floor(sqrt(u) T), P(t < T/2) = 1/4, E[t] = 2T/3; uniform: 1/2, T/2
    t = sample_timesteps(40000, torch.Generator().manual_seed(1), num_train_steps=1000, density=density)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) == 999
    assert abs(t.float().mean().item() / 1000 - mean) < 0.01
    assert abs((t < 500).float().mean().item() - below_half) < 0.01
    again = sample_timesteps(40000, torch.Generator().manual_seed(1), num_train_steps=1000, density=density)
    assert torch.equal(t, again)


def test_sample_timesteps_rejects_an_unknown_density():
    with pytest.raises(ConfigError, match="timestep density must be one of .*'cubic'"):
        sample_timesteps(4, torch.Generator(), density="cubic")
