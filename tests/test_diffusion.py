"""Diffusion numerics against diffusers as an independent reference (docs/method.md §6.1, §8.2)."""

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from latent_lm.diffusion import (NoiseSchedule, add_noise, dpm_solver_coefficients, dpm_solver_sample, make_schedule,
                                 predict_x0, solver_timesteps, training_target, velocity)
from reference_samplers import ddpm_sample, ddpm_timesteps

# diffusers' own numpy-2 deprecation noise (np.array on a torch tensor inside set_timesteps).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SCHEDULE = make_schedule("cosine")
AB = np.asarray(SCHEDULE.alphas_cumprod)
A_TAB, S_TAB = np.sqrt(AB), np.sqrt(1 - AB)  # float32 tables shared by the numpy and jax toy models
RNG = np.random.default_rng(0)
X_T = RNG.standard_normal((4, 3, 8)).astype(np.float32)
X0_FIXED = RNG.standard_normal((4, 3, 8)).astype(np.float32)


def toy_model(x, t, prediction_type: str):
    """Elementwise, so numpy and XLA agree bit for bit: the output whose x̂₀ is x0_fixed·(1 + t/1000) + 0.2·x.

    x̂₀ depends on x and t, so the 2nd-order history term (m₀ − m₋₁) is exercised; it stays O(1) (well conditioned).
    """
    if isinstance(x, jax.Array):
        a, s, tf = jnp.asarray(A_TAB)[t][..., None], jnp.asarray(S_TAB)[t][..., None], t[..., None] / 1000.0
    else:
        a, s, tf = A_TAB[t], S_TAB[t], np.float32(t / 1000.0)
    target = X0_FIXED * (1 + tf) + np.float32(0.2) * x
    eps = (x - a * target) / s
    return eps if prediction_type == "epsilon" else a * eps - s * target


def diffusers_dpm(prediction_type: str, k: int, dtype: torch.dtype) -> np.ndarray:
    """The official loop: `for t in timesteps: x = step(model(x, t), t, x)`; the model always runs in float32.

    With dtype=float64 diffusers forms x̂₀ and the update in float64 (its float32 coefficients unchanged).
    """
    sched = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    sched.set_timesteps(k)
    x = torch.from_numpy(X_T).to(dtype)
    for t in sched.timesteps:
        out = toy_model(x.float().numpy(), int(t), prediction_type)
        x = sched.step(torch.from_numpy(out).to(dtype), t, x).prev_sample
    return x.double().numpy()


_jit_dpm = jax.jit(lambda x, k, pt: dpm_solver_sample(lambda x, t: toy_model(x, t, pt), x, SCHEDULE, k, pt),
                   static_argnums=(1, 2))


def test_alphas_cumprod_match_diffusers():
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.numpy()
    assert np.abs(AB - ref).max() <= 1e-6
    np.testing.assert_allclose(AB, ref, rtol=1e-6)  # also relative: ᾱ reaches 2.4e-9
    assert AB[0] == pytest.approx(0.99995869, abs=1e-8) and AB[999] == pytest.approx(2.43e-9, rel=0.01)
    lin = DDPMScheduler(beta_schedule="linear").alphas_cumprod.numpy()
    np.testing.assert_allclose(np.asarray(make_schedule("linear").alphas_cumprod), lin, rtol=1e-6)
    assert make_schedule("cosine", 100).num_train_steps == 100
    with pytest.raises(ValueError):
        make_schedule("sigmoid")


def test_add_noise_velocity_targets_match_diffusers():
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, noise = RNG.standard_normal((2, 6, 5, 4)).astype(np.float32)
    t = np.array([[0, 1, 250, 500, 998, 999]] * 5).T  # [6, 5]: per-token timesteps
    flat = lambda a: torch.from_numpy(a.reshape(30, 4))  # noqa: E731 (diffusers wants t over the leading dim)
    tt = torch.from_numpy(t.reshape(30))
    want_xt = ref.add_noise(flat(x0), flat(noise), tt).numpy().reshape(6, 5, 4)
    want_v = ref.get_velocity(flat(x0), flat(noise), tt).numpy().reshape(6, 5, 4)
    np.testing.assert_allclose(add_noise(SCHEDULE, x0, noise, t), want_xt, atol=1e-6)
    np.testing.assert_allclose(velocity(SCHEDULE, x0, noise, t), want_v, atol=1e-6)
    np.testing.assert_array_equal(training_target("epsilon", x0, noise, t, SCHEDULE), noise)
    np.testing.assert_allclose(training_target("v_prediction", x0, noise, t, SCHEDULE), want_v, atol=1e-6)
    x_t = add_noise(SCHEDULE, x0, noise, t)
    mid = t <= 500  # where x̂₀ is well conditioned for both parameterisations
    np.testing.assert_allclose(predict_x0("epsilon", noise, x_t, t, SCHEDULE)[mid], x0[mid], atol=1e-4)
    np.testing.assert_allclose(predict_x0("v_prediction", want_v, x_t, t, SCHEDULE), x0, atol=1e-5)
    assert add_noise(SCHEDULE, x0.astype(jnp.bfloat16), noise, t).dtype == jnp.float32
    with pytest.raises(ValueError):
        training_target("sample", x0, noise, t, SCHEDULE)


def test_solver_timesteps_match_diffusers():
    np.testing.assert_array_equal(solver_timesteps(5), [999, 799, 599, 400, 200])
    np.testing.assert_array_equal(solver_timesteps(20), [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450,
                                                         400, 350, 300, 250, 200, 150, 100, 50])
    for k in (1, 2, 3, 5, 20, 250):
        sched = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
        sched.set_timesteps(k)
        np.testing.assert_array_equal(solver_timesteps(k), sched.timesteps.numpy())
        c = dpm_solver_coefficients(SCHEDULE, k)
        alpha, sigma = sched._sigma_to_alpha_sigma_t(sched.sigmas[:-1])
        np.testing.assert_allclose(c.alpha_s, alpha.numpy(), rtol=1e-6)
        np.testing.assert_allclose(c.sigma_s, sigma.numpy(), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 20])
def test_dpm_solver_matches_diffusers(prediction_type, k):
    ours = np.asarray(_jit_dpm(X_T, k, prediction_type), np.float64)
    err32 = np.abs(ours - diffusers_dpm(prediction_type, k, torch.float32)).max()
    err64 = np.abs(ours - diffusers_dpm(prediction_type, k, torch.float64)).max()
    print(f"{prediction_type} K={k}: max|Δ| vs diffusers fp32 {err32:.2e}, fp64-sample {err64:.2e}")
    # ε at t=999: x̂₀ = (x − σ_t·ε̂)/α_t, α_t ≈ 4.9e-5, cancels ~4 digits, so one float32 rounding of x − σ_t·ε̂
    # (XLA contracts it into an FMA, torch does not) shows up as ~2e-3 in x̂₀. diffusers fed float64 samples forms
    # x̂₀ without that rounding; we must match one of the two references to 1e-5 (v-prediction matches both).
    assert min(err32, err64) <= 1e-5
    if prediction_type == "v_prediction":
        assert err32 <= 1e-5


def test_dpm_solver_single_step_returns_x0_and_clips():
    x0 = dpm_solver_sample(lambda x, t: toy_model(x, t, "v_prediction"), X_T, SCHEDULE, 1, "v_prediction")
    np.testing.assert_allclose(x0, X0_FIXED * 1.999 + 0.2 * X_T, atol=1e-5)  # K=1: one DDIM step to σ=0 is x̂₀(x_T)
    clipped = dpm_solver_sample(lambda x, t: toy_model(x, t, "v_prediction") * 50, X_T, SCHEDULE, 5,
                                "v_prediction", x0_clip=1.5)
    assert float(jnp.abs(clipped).max()) <= 1.5 + 1e-6


def test_dpm_solver_under_jit_and_outer_scan():
    """One solve per position inside a scan (as the sampler does); a traced schedule works too.

    v-prediction, because ε-prediction's x̂₀ at t=999 differs by ~1e-4 between any two compilations (see above).
    """
    V = "v_prediction"
    noises = jnp.asarray(RNG.standard_normal((3, 4, 3, 8)).astype(np.float32))

    @jax.jit
    def over_positions(noises, schedule: NoiseSchedule):
        def body(carry, x_T):
            x0 = dpm_solver_sample(lambda x, t: toy_model(x, t, V) + 0.01 * carry, x_T, schedule, 5, V)
            return carry + 1.0, x0
        return jax.lax.scan(body, jnp.zeros(()), noises)[1]

    got = over_positions(noises, SCHEDULE)
    for i in range(3):
        want = dpm_solver_sample(lambda x, t: toy_model(x, t, V) + 0.01 * i, noises[i], SCHEDULE, 5, V)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_ddpm_timesteps():
    np.testing.assert_array_equal(ddpm_timesteps(10), np.arange(900, -1, -100))
    np.testing.assert_array_equal(ddpm_timesteps(None), np.arange(999, -1, -1))
    sched = DDPMScheduler()
    sched.set_timesteps(7)
    np.testing.assert_array_equal(ddpm_timesteps(7), sched.timesteps.numpy())


@pytest.mark.parametrize("prediction_type,k", [("epsilon", None), ("v_prediction", 25)])
def test_ddpm_matches_diffusers_with_injected_noise(prediction_type, k, monkeypatch):
    rng = jax.random.key(3)
    fn = jax.jit(lambda x, rng: ddpm_sample(lambda x, t: toy_model(x, t, prediction_type), x, SCHEDULE, rng, k,
                                            prediction_type))
    ours = np.asarray(fn(X_T, rng))
    np.testing.assert_array_equal(ours, fn(X_T, rng))  # deterministic given rng
    assert not np.allclose(ours, fn(X_T, jax.random.key(4)))

    # Feed diffusers the exact noise our step i draws (key i of split(rng, K)); it draws only when t > 0.
    steps = len(ddpm_timesteps(k))
    zs = iter(torch.from_numpy(np.array(jax.vmap(lambda key: jax.random.normal(key, X_T.shape))(
        jax.random.split(rng, steps)))))
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **kw: next(zs))
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", clip_sample=False,
                          prediction_type=prediction_type)
    if k is not None:
        sched.set_timesteps(k)
    x = torch.from_numpy(X_T)
    for t in sched.timesteps:
        x = sched.step(torch.from_numpy(toy_model(x.numpy(), int(t), prediction_type)), t, x).prev_sample
    err = np.abs(ours - x.numpy()).max()
    print(f"ddpm {prediction_type} K={k}: max|Δ| {err:.2e}")
    assert err <= 1e-4
