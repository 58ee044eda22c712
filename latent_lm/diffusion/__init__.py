"""Diffusion numerics: DDPM schedules and targets (docs/method.md §6.1), the DPM-Solver++(2M) sampler
(docs/method.md §8.2)."""

from latent_lm.diffusion.dpm_solver import (SolverCoefficients, dpm_solver_coefficients, dpm_solver_sample,
                                            solver_timesteps)
from latent_lm.diffusion.schedule import (PREDICTION_TYPES, NoiseSchedule, add_noise, cosine_betas, linear_betas,
                                          make_schedule, predict_x0, training_target, velocity)

__all__ = [
    "PREDICTION_TYPES", "NoiseSchedule", "SolverCoefficients", "add_noise", "cosine_betas", "dpm_solver_coefficients",
    "dpm_solver_sample", "linear_betas", "make_schedule", "predict_x0", "solver_timesteps", "training_target",
    "velocity",
]
