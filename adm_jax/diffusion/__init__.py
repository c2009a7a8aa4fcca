"""Gaussian diffusion for ADM: schedules, forward/reverse math, losses, timestep samplers and
guided samplers (ancestral, DDIM and its inversion, DPM-Solver++, UniPC, the k-diffusion
samplers; classifier and classifier-free guidance, guidance intervals, x_0 corrections, SDEdit
starts), as pure JAX functions over a static `Diffusion` constants object.

See docs/diffusion.md for the equation -> function map.
"""

from adm_jax.diffusion.cfg import classifier_free_model_fn
from adm_jax.diffusion.dpm_solver import (
    dpm_solver_plan,
    dpm_solver_sample,
    dynamic_threshold,
)
from adm_jax.diffusion.gaussian import (
    condition_mean,
    condition_score,
    extract,
    model_timesteps,
    model_variance,
    p_mean_variance,
    p_mean_variance_from_output,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    predict_xstart_from_xprev,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from adm_jax.diffusion.karras import (
    karras_noise,
    karras_plan,
    karras_sample,
    karras_sigmas,
)
from adm_jax.diffusion.losses import (
    approx_standard_normal_cdf,
    bpd_terms,
    calc_bpd_loop,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    prior_bpd,
    training_losses,
    vb_terms_bpd,
)
from adm_jax.diffusion.repaint import (
    get_schedule_jump,
    repaint_draw_order,
    repaint_noise,
    repaint_sample,
)
from adm_jax.diffusion.samplers import (
    classifier_guidance_grad,
    ddim_invert,
    ddim_reverse_sample,
    ddim_sample,
    p_sample,
    sample,
    sample_loop,
    sample_noise,
)
from adm_jax.diffusion.schedules import (
    COEFFICIENT_NAMES,
    Diffusion,
    betas_for_alpha_bar,
    create_diffusion,
    diffusion_kwargs_from_flags,
    get_named_beta_schedule,
    make_diffusion,
    respace_betas,
    space_timesteps,
)
from adm_jax.diffusion.timestep_sampler import (
    LossSecondMomentState,
    importance_sample_timesteps,
    loss_second_moment_init,
    loss_second_moment_update,
    loss_second_moment_warmed_up,
    loss_second_moment_weights,
    uniform_sample_timesteps,
)
from adm_jax.diffusion.unipc import unipc_plan, unipc_sample

__all__ = [
    "COEFFICIENT_NAMES",
    "Diffusion",
    "LossSecondMomentState",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "bpd_terms",
    "calc_bpd_loop",
    "classifier_free_model_fn",
    "classifier_guidance_grad",
    "condition_mean",
    "condition_score",
    "create_diffusion",
    "ddim_invert",
    "ddim_reverse_sample",
    "ddim_sample",
    "diffusion_kwargs_from_flags",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_plan",
    "dpm_solver_sample",
    "dynamic_threshold",
    "extract",
    "get_named_beta_schedule",
    "get_schedule_jump",
    "importance_sample_timesteps",
    "karras_noise",
    "karras_plan",
    "karras_sample",
    "karras_sigmas",
    "loss_second_moment_init",
    "loss_second_moment_update",
    "loss_second_moment_warmed_up",
    "loss_second_moment_weights",
    "make_diffusion",
    "mean_flat",
    "model_timesteps",
    "model_variance",
    "normal_kl",
    "p_mean_variance",
    "p_mean_variance_from_output",
    "p_sample",
    "predict_eps_from_xstart",
    "predict_xstart_from_eps",
    "predict_xstart_from_xprev",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "repaint_draw_order",
    "repaint_noise",
    "repaint_sample",
    "respace_betas",
    "sample",
    "sample_loop",
    "sample_noise",
    "space_timesteps",
    "training_losses",
    "uniform_sample_timesteps",
    "unipc_plan",
    "unipc_sample",
    "vb_terms_bpd",
]
