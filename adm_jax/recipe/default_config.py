"""The base config: every field any mode reads, with the reference's defaults.

Not a published model by itself: the variants (configs/imagenet64.py, classifier256.py,
tiny.py, ...) import it (as ``configs/default.py``, which re-exports this module) and override
a handful of fields, so a field that exists here exists everywhere and
``adm_jax.train.validate_config`` can reject any name that is not here. Part of the package,
so an installed adm_jax has its schema without a checkout.

Sources: architecture and diffusion defaults are guided-diffusion's ``script_util``
defaults (``adm_jax.reference_defaults``; this config differs only where noted: it trains
learn_sigma=True, the paper's models); optimiser defaults are the paper's App. I recipe
(AdamW b1 0.9, b2 0.999, EMA 0.9999); the sampling/evaluation defaults are the reference
scripts' defaults.
"""

import ml_collections
from ml_collections import config_dict

from adm_jax.reference_defaults import (
    CLASSIFIER_DEFAULTS,
    DIFFUSION_DEFAULTS,
    MODEL_DEFAULTS,
    NUM_CLASSES,
    SCRIPT_FLAGS,
    SR_DEFAULTS,
)

# The paper's models learn the variance (the README's MODEL_FLAGS all pass --learn_sigma
# True); script_util's default is False.
LEARN_SIGMA = True

# README flags understood by adm_jax.models.reference_kwargs_from_flags, by model kind, in
# create_model's argument order (use_checkpoint, a PyTorch memory option, is not a field).
_UNET_FLAG_NAMES = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "learn_sigma",
    "class_cond",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "dropout",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
)
UNET_FLAGS = {
    name: {**MODEL_DEFAULTS, **DIFFUSION_DEFAULTS, "learn_sigma": LEARN_SIGMA}[name]
    for name in _UNET_FLAG_NAMES
}
# config.model fields of diffusion models that are not README flags: they change training, and
# the network only through adm_jax.train.model_kwargs (class_dropout_prob > 0 adds the
# null-label embedding row that classifier-free guidance needs).
# Not reference flags (the reference fixes RGB and ImageNet's 1000 classes); every model kind
# has them, and the defaults give exactly the reference's constructor arguments.
SHAPE_EXTRAS = dict(
    in_channels=3,  # image channels: 1 for grey images (data.channels must agree)
    num_classes=NUM_CLASSES,  # label range of class-conditional models and classifiers
)
DIFFUSION_MODEL_EXTRAS = dict(
    **SHAPE_EXTRAS,
    # Classifier-free guidance training (Ho & Salimans 2022): each label is replaced by the
    # null label with this probability (0.1-0.2 typical; 0 = off, the reference's training).
    class_dropout_prob=0.0,
)
# create_classifier's argument order.
_CLASSIFIER_FLAG_NAMES = (
    "image_size",
    "classifier_width",
    "classifier_depth",
    "classifier_attention_resolutions",
    "classifier_use_scale_shift_norm",
    "classifier_resblock_updown",
    "classifier_pool",
    "classifier_use_fp16",
)
CLASSIFIER_FLAGS = {
    **{name: CLASSIFIER_DEFAULTS[name] for name in _CLASSIFIER_FLAG_NAMES},
    # Not a reference classifier flag (create_classifier derives it from image_size); only
    # tiny test configs set it, for sizes the reference table lacks.
    "channel_mult": "",
}
# config.diffusion: adm_jax.diffusion.create_diffusion's kwargs (training process: no
# respacing), from diffusion_defaults() as diffusion_kwargs_from_flags maps them.
_DIFFUSION = dict(
    steps=DIFFUSION_DEFAULTS["diffusion_steps"],
    noise_schedule=DIFFUSION_DEFAULTS["noise_schedule"],
    learn_sigma=LEARN_SIGMA,
    sigma_small=SCRIPT_FLAGS["sigma_small"],
    use_kl=DIFFUSION_DEFAULTS["use_kl"],
    predict_xstart=DIFFUSION_DEFAULTS["predict_xstart"],
    rescale_learned_sigmas=DIFFUSION_DEFAULTS["rescale_learned_sigmas"],
    timestep_respacing=DIFFUSION_DEFAULTS["timestep_respacing"],
)


def unet_model(**overrides) -> ml_collections.ConfigDict:
    """config.model for a diffusion UNet ("unet", or "superres" with large/small_size)."""
    return ml_collections.ConfigDict(
        {"kind": "unet", **UNET_FLAGS, **DIFFUSION_MODEL_EXTRAS, **overrides}
    )


def superres_model(**overrides) -> ml_collections.ConfigDict:
    flags = {k: v for k, v in UNET_FLAGS.items() if k not in ("image_size", "channel_mult")}
    flags.pop("use_new_attention_order")  # sr_create_model ignores it
    return ml_collections.ConfigDict(
        {
            "kind": "superres",
            **flags,
            **SR_DEFAULTS,
            **DIFFUSION_MODEL_EXTRAS,
            **overrides,
        }
    )


def classifier_model(**overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"kind": "classifier", **CLASSIFIER_FLAGS, **SHAPE_EXTRAS, **overrides}
    )


# adm_jax.data.create_train_iterator's data_config.
def _data_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="imagenet2012",
            data_dir="",
            image_size=64,
            channels=3,
            class_cond=False,
            random_flip=True,
            random_crop=False,
            num_workers=16,
            shuffle_buffer=10_000,
            split="train",
            eval_split="validation",
            max_skipped_fraction=0.001,
        )
    )


def _train_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            num_steps=500_000,
            batch_size=256,  # global, over all devices
            grad_accum_steps=1,  # microbatches scanned inside one step (reference --microbatch)
            # AdamW (paper App. I).
            lr=1e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=0,
            # Linear decay to 0 at this step, as the reference's --lr_anneal_steps (0: constant;
            # classifier_train.py's --anneal_lr is lr_anneal_steps = num_steps).
            lr_anneal_steps=0,
            grad_clip=0.0,  # global-norm clip; 0 disables (the reference does not clip)
            ema_rate="0.9999",  # comma-separated; "" for none (the classifier keeps none)
            # Post-hoc EMA (EDM2): power-function EMAs of these relative stds (sigma_rel,
            # comma-separated, e.g. "0.05,0.10"; "" = none), snapshotted every
            # posthoc_ema_every steps into WORKDIR/posthoc_ema; --mode=export with
            # export_ema_std reconstructs any other length from them (docs/training.md).
            posthoc_ema_stds="",
            posthoc_ema_every=0,
            export_ema_std=config_dict.placeholder(float),
            schedule_sampler="uniform",  # or "loss-second-moment" (importance sampling of t)
            noised=True,  # classifier: train on x_t at uniformly random t
            # Precision: compute dtype of the network; master weights, EMA and Adam in float32.
            dtype="bfloat16",
            # Rematerialisation of every ResBlock and AttentionBlock: "none" | "full" (keep
            # only block inputs) | "dots-saveable" (also keep conv/matmul outputs); see
            # docs/training.md for the memory each saves.
            remat="none",
            # Attention kernel: "auto" (cuDNN flash attention on GPU in bfloat16, XLA elsewhere),
            # "xla" or "cudnn"; sampling uses the same choice.
            attention_impl="auto",
            # Sharding: mesh (data, fsdp); arrays with >= fsdp_min_size elements are split over
            # "fsdp" along their largest divisible dimension.
            fsdp=1,
            fsdp_min_size=2**18,
            # Non-finite loss/gradient: the update is skipped; this many in a row stop the run.
            max_consecutive_nonfinite=20,
            # Periodic work (steps; 0 disables).
            log_every=100,
            checkpoint_every=5_000,
            max_to_keep=3,
            async_checkpointing=True,
            eval_every=5_000,
            eval_batches=4,
            sample_every=20_000,
            num_sample_images=16,
            sample_respacing="ddim50",
            profile_steps=0,  # >0: capture a profile of this many steps after the first log
            # TensorBoard event files (through TensorFlow's gfile); metrics.jsonl is always written.
            tensorboard=True,
            # Fine-tuning: start from these parameters (a converted reference checkpoint, an
            # exported inference checkpoint, or another run's workdir) at step 0 with a fresh
            # optimizer; the EMA starts from them. Ignored once this run has a checkpoint.
            init_from="",
        )
    )


# --mode=sample (adm_jax.sampling.sample); defaults are the reference scripts'.
def _sample_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            checkpoint="",  # training workdir or inference checkpoint; "" = --workdir
            classifier_checkpoint="",
            classifier_scale=1.0,
            num_samples=10_000,
            batch_size=16,
            # "ddpm" (ancestral) | "ddim" | "dpm++" (DPM-Solver++(2M)) | "unipc" | k-diffusion's
            # "heun" | "euler_ancestral" | "dpmpp_2m" | "dpmpp_2m_sde"; see docs/sampling.md.
            sampler="ddpm",
            # Model evaluations (NFE). ddpm/ddim: >0 replaces timestep_respacing by "N" /
            # "ddimN", 0 keeps timestep_respacing. The solvers: steps (0 means 20).
            steps=0,
            sigma_grid="karras",  # k-diffusion samplers: "karras" (rho 7) | "discrete"
            s_churn=0.0,  # heun: EDM's churn (0 = deterministic)
            unipc_variant="bh2",  # unipc: "bh1" | "bh2"
            # Guidance (classifier and classifier-free) only where lo < sigma <= hi, "lo,hi",
            # sigma = sqrt((1 - abar) / abar) at each model call (every sampler); "" = at
            # every step.
            guidance_interval="",
            # Correction of every x_0 prediction: "clip" ([-1, 1]) | "threshold" (dynamic
            # thresholding, Imagen) | "none"; "" = the sampler's default (ddpm/ddim clip, the
            # others none). Old spellings: thresholding=True, clip_denoised=False (ddpm/ddim).
            x0_correction="",
            # Classifier-free guidance scale (1 = conditional, 0 = unconditional, >1 guided);
            # None = off. Needs a model trained with model.class_dropout_prob > 0.
            cfg_scale=config_dict.placeholder(float),
            thresholding=False,  # the old spelling of x0_correction="threshold"
            use_ddim=False,  # the old spelling of sampler="ddim"
            # Noise of ddim (0 = deterministic), euler_ancestral and dpmpp_2m_sde (1 = full
            # ancestral noise); None = the sampler's default (0 for ddim, 1 for the others).
            eta=config_dict.placeholder(float),
            timestep_respacing="250",
            clip_denoised=True,  # ddpm/ddim: False is the old spelling of x0_correction="none"
            class_labels="random",
            seed=0,
            output_dir="",
            base_samples="",
            sweep_scales="",
            # The guidance sweep's grid: comma lists; "" = just sample.sampler / sample.steps.
            sweep_samplers="",
            sweep_steps="",
            # Guidance intervals to sweep, ";"-separated: "full" (every step) or "lo,hi"
            # (sample.guidance_interval's form), e.g. "full;0.3,5"; "" = just
            # sample.guidance_interval.
            sweep_guidance_intervals="",
            reference_batch="",
            num_classes=0,  # >0: draw random labels below this (e.g. a 10-class toy set)
            dtype="",  # compute dtype for sampling; "" = float32
        )
    )


# --mode=edit (adm_jax.sampling.edit): edit existing images with the sample.* model,
# classifier, sampler, guidance, batch_size and seed; docs/editing.md.
def _edit_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="inpaint",  # "inpaint" (RePaint) | "sdedit" | "class_swap" (DDIM inversion)
            images="",  # a folder of images (centre-cropped to the model) or a .npz (arr_0)
            # The images' own labels: "" = arr_1 of the .npz (none for a folder), "subdir" |
            # "prefix" | "suffix" (from a folder's file names), "none", or comma-separated ints.
            labels="",
            # Labels to steer towards: "" = the images' own, comma-separated ints (cycled),
            # or "random".
            target_labels="",
            # inpaint: "half" | "thick" | "thin" | "every_second_line" | "super_resolve" | a
            # folder of mask PNGs (white = keep; one per image or one for all).
            masks="",
            strength=0.5,  # sdedit: noise the image to this point of the sampler's grid, (0, 1]
            jump_length=10,  # inpaint: RePaint's resampling jumps (1 = none)
            jump_n_sample=10,
            num_images=0,  # the first N images; 0 = all
            output_dir="",  # "" = WORKDIR/edits/<kind>
        )
    )


# --mode=evaluate (adm_jax.evaluation.evaluate).
def _evaluate_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            sample_npz="",
            reference_batch="",
            inception_weights="",
            inception_sha256="",  # expected SHA-256 of the weights' source; "" = official, "none"
            batch_size=64,
            resize="tf",
            distance="float32",  # precision/recall distances: "float32" | "float64"
        )
    )


# --mode=nll (adm_jax.evaluation.nll): bits/dim on a data split, as the reference's
# scripts/image_nll.py (its defaults: 1000 images, clip_denoised True, all T steps).
def _nll_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            checkpoint="",  # training workdir or inference checkpoint; "" = sample.checkpoint
            split="",  # TFDS split of config.data; "" = data.eval_split (else data.split)
            num_samples=1000,  # the split's first N images; 0 = all of it
            batch_size=64,  # global, over all devices
            clip_denoised=True,
            timestep_respacing="",  # "" = the full T-step bound; "250" etc. a respaced one
            seed=0,  # noise of batch b: fold_in(PRNGKey(seed), b)
        )
    )


def get_config() -> ml_collections.ConfigDict:
    """The base config: one section per part of the job."""
    config = ml_collections.ConfigDict()
    # README flags (script_util names) + kind; the module is built with
    # adm_jax.models.module_from_kwargs(kind, reference_kwargs_from_flags(kind, flags)).
    config.model = unet_model()
    # adm_jax.diffusion.create_diffusion kwargs (training process: no respacing).
    config.diffusion = ml_collections.ConfigDict(dict(_DIFFUSION))
    config.data = _data_section()
    config.train = _train_section()
    config.sample = _sample_section()
    config.edit = _edit_section()
    config.evaluate = _evaluate_section()
    config.nll = _nll_section()
    return config


def classifier_config(
    image_size: int, *, num_steps: int, noise_schedule: str = "linear", **model_overrides
) -> ml_collections.ConfigDict:
    """A noisy-classifier config: README classifier TRAIN_FLAGS ("--iterations 300000
    --anneal_lr True --batch_size 256 --lr 3e-4 --save_interval 10000 --weight_decay 0.05"),
    paper App. I (AdamW lr 3e-4, weight decay 0.05, batch 256, x_t at uniformly random t),
    random crops as in classifier_train.py, and no EMA (the reference keeps none)."""
    config = get_config()
    config.model = classifier_model(image_size=image_size, **model_overrides)
    config.diffusion.noise_schedule = noise_schedule
    config.data.image_size = image_size
    config.data.class_cond = True
    config.data.random_crop = True
    config.train.lr = 3e-4
    config.train.weight_decay = 0.05
    config.train.batch_size = 256
    config.train.num_steps = num_steps
    config.train.lr_anneal_steps = num_steps
    config.train.ema_rate = ""
    config.train.checkpoint_every = 10_000
    config.train.sample_every = 0
    return config
