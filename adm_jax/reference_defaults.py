"""guided-diffusion's defaults, by the reference scripts' flag names: written here once.

``script_util.py``'s ``diffusion_defaults``, ``model_and_diffusion_defaults`` (its model
part), ``classifier_defaults``, ``sr_model_and_diffusion_defaults`` (large/small size) and
``NUM_CLASSES``; ``SCRIPT_FLAGS`` are the reference scripts' own flags that do not shape the
network (``image_sample.py``, ``image_train.py``, ``classifier_train.py``, ...), with
``create_gaussian_diffusion``'s ``sigma_small=False``.

Derived from these: ``adm_jax.models.factory`` (README flags -> constructor arguments),
``adm_jax.diffusion.schedules.diffusion_kwargs_from_flags`` (missing flags) and the base
config ``adm_jax.recipe.default_config`` (which trains learn_sigma=True, the paper's). A
leaf: imports nothing from adm_jax.
"""

NUM_CLASSES = 1000

DIFFUSION_DEFAULTS = dict(
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
)
MODEL_DEFAULTS = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
)
CLASSIFIER_DEFAULTS = dict(
    image_size=64,
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)
SR_DEFAULTS = dict(large_size=256, small_size=64)
# Flags of the reference sampling / training scripts that do not shape the network.
SCRIPT_FLAGS = dict(
    sigma_small=False,
    batch_size=1,
    microbatch=-1,
    num_samples=10000,
    use_ddim=False,
    clip_denoised=True,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,
    base_samples="",
    data_dir="",
    val_data_dir="",
    schedule_sampler="uniform",
    lr=1e-4,
    weight_decay=0.0,
    lr_anneal_steps=0,
    ema_rate="0.9999",
    log_interval=10,
    save_interval=10000,
    eval_interval=5,
    resume_checkpoint="",
    fp16_scale_growth=1e-3,
    noised=True,
    iterations=150000,
    anneal_lr=False,
)
