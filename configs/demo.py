"""The demo: ADM's whole pipeline on 5000 embedded MNIST digits, on a laptop CPU.

    python -m adm_jax.main --config=configs/demo.py --workdir=demo_workdir
    python -m adm_jax.demo --workdir=demo_workdir            # the same, without main.py

``adm_jax.demo.run(config, workdir)`` prepares the ``mnist_demo`` TFDS dataset, trains ONE
small class-conditional learned-sigma UNet on the grey digits (one channel, label dropout, so
its null label is the unconditional model) with ``adm_jax.train.train_and_evaluate``, its noisy
classifier (EncoderUNet + attention pool) with ``train_classifier``, an independent clean digit
classifier (the feature space of the metrics), then samples the table's rows with
``adm_jax.evaluation.guidance_sweep`` (unconditional and conditional model with classifier
guidance, classifier-free guidance, SDE-DPM-Solver++(2M) at 10 and 20 NFE, classifier-free
guidance inside a sigma interval) and inpaints held-out digits towards another digit
(``--mode=edit``'s RePaint), and reports FID / precision / recall (on the independent
classifier's features, NOT Inception) and target-class accuracy. The sampler table of
docs/sampling.md (every sampler x NFE 10 / 20 / 50) is one more stage:

    python -m adm_jax.main --config=configs/demo.py --workdir=demo_workdir \
        --config.demo.sampler_table=True

The top-level sections are those of configs/default.py (they describe the diffusion run) plus
``classifier`` (a complete classifier-run config) and ``demo`` (everything else); any field can
be overridden, e.g. ``--config.sample.sweep_scales=0,1,10`` or ``--config.train.num_steps=600``.

Hardware / time: 2-core AMD EPYC VM, CPU only. 8.1 minutes for the whole demo from an empty
workdir on 2026-12-01 (budget 12; stages in docs/demo.md), when PyTorch's reference step ran at
202-252 img/s there, before the interval, fast-sampler and inpainting rows (about 1.5 minutes
more at that speed, an estimate); the same config took 34 minutes on a slow hour of that VM
(60-74 img/s), and the current one 76 minutes while three other jobs shared the machine.
A rerun with everything done takes seconds. The digits are downsampled to 16x16 by the
pipeline's ADM center crop (BOX + BICUBIC). Measured table and pictures: docs/demo.md.
"""

import ml_collections

from configs import default

IMAGE_SIZE = 16
NUM_DIGITS = 10
# Training lengths: shorter than the unconditional demo's 2000 / 800 / 1500 steps, to leave
# time for the 10 sampled rows; a class-conditional model learns digits in fewer steps.
DIFFUSION_STEPS = 1400
CLASSIFIER_STEPS = 600


def _data(config) -> None:
    d = config.data
    d.name = "mnist_demo"
    d.data_dir = ""  # "": WORKDIR/tfds
    d.image_size = IMAGE_SIZE
    d.channels = 1  # grey digits; the networks take model.in_channels=1
    d.class_cond = True
    d.random_flip = False  # A mirrored 3 is not a digit.
    d.num_workers = 0  # 32x32 PNGs decode faster in-process than through worker processes.
    d.shuffle_buffer = 0  # Exact global shuffle: the whole split is 4500 records.
    d.split = "train"
    d.eval_split = "test"


def _train(config, *, num_steps: int, lr: float, batch_size: int) -> None:
    t = config.train
    t.num_steps = num_steps
    t.batch_size = batch_size
    t.lr = lr
    t.warmup_steps = 50
    t.grad_clip = 1.0
    t.dtype = "float32"  # bfloat16 is emulated, thus slow, on CPU.
    t.log_every = 50
    t.checkpoint_every = 0  # Only the final checkpoint: each stage runs in one sitting.
    t.max_to_keep = 1
    t.async_checkpointing = False
    t.eval_every = 0
    t.sample_every = 0
    t.fsdp = 1


def classifier_config() -> ml_collections.ConfigDict:
    """The noisy classifier p_phi(y | x_t, t) that guides sampling (paper Sec. 4)."""
    config = default.classifier_config(
        IMAGE_SIZE,
        num_steps=CLASSIFIER_STEPS,
        noise_schedule="cosine",
        classifier_width=32,
        classifier_depth=1,
        classifier_attention_resolutions="8",
        channel_mult="1,2,2",
        in_channels=1,
        num_classes=NUM_DIGITS,
    )
    _data(config)
    # The reference random-crops classifier inputs (zoom up to 1.25x); on centred 16x16 digits
    # that cuts strokes off and teaches the classifier bolder digits than the data holds.
    # Measured at scale 10: target accuracy 0.884 with crops, 0.904 without; FID 37 -> 25.
    config.data.random_crop = False
    _train(config, num_steps=CLASSIFIER_STEPS, lr=1e-3, batch_size=64)
    config.train.weight_decay = 0.05
    config.train.lr_anneal_steps = CLASSIFIER_STEPS
    config.train.ema_rate = ""
    return config


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.mode = "demo"  # adm_jax.main dispatches to adm_jax.demo.run
    config.model = default.unet_model(
        image_size=IMAGE_SIZE,
        # 64, not 32: GroupNorm has 32 groups, and with one channel per group the network
        # cannot carry an image's mean level through its norms (every sample then gets a flat
        # grey background); two channels per group can. See docs/demo.md.
        num_channels=64,
        num_res_blocks=1,
        channel_mult="1,1,2",
        attention_resolutions="8",
        num_heads=2,
        learn_sigma=True,  # learned Sigma + hybrid loss (Improved DDPM), as ADM
        # ONE class-conditional model trained with label dropout: its null label is the
        # unconditional model (both halves of Table 4) and enables classifier-free guidance.
        class_cond=True,
        num_classes=NUM_DIGITS,
        class_dropout_prob=0.15,
        in_channels=1,
        dropout=0.0,
        resblock_updown=False,
        use_scale_shift_norm=True,
    )
    config.diffusion.noise_schedule = "cosine"
    config.diffusion.learn_sigma = True
    _data(config)
    _train(config, num_steps=DIFFUSION_STEPS, lr=1e-3, batch_size=32)
    # A short run needs a short EMA (0.9999 averages over ~10K steps).
    config.train.ema_rate = "0.995"

    # Ancestral (DDPM) sampling on 25 respaced steps with the learned variances: as cheap as
    # DDIM-25 and visibly cleaner for a model this short-trained (DDIM keeps more noise).
    config.sample.use_ddim = False
    config.sample.timestep_respacing = "25"
    config.sample.batch_size = 100
    config.sample.num_samples = 500  # as many as the held-out real digits
    config.sample.class_labels = "random"  # The demo draws random digits 0..9 itself.
    config.sample.seed = 0
    # The table's rows (demo.ROW_GROUPS): classifier guidance of the unconditional model (its
    # null label) and of the conditional one, classifier-free guidance, and DPM-Solver++ at
    # 10 and 20 model evaluations beside DDPM-25.
    config.sample.sweep_scales = "0,1,10"  # the conditional model's classifier scales

    config.classifier = classifier_config()

    config.demo = ml_collections.ConfigDict(
        dict(
            # Independent clean-digit CNN: features for FID/precision/recall, judge of accuracy.
            judge_steps=1000,
            judge_batch_size=64,
            judge_lr=2e-3,
            judge_width=32,
            judge_features=128,
            nhood_size=3,  # k of the k-NN manifolds (paper: 3)
            num_classes=NUM_DIGITS,
            # Rows of the table besides the conditional model's sample.sweep_scales ("" skips
            # a group). Unconditional = the null label (classifier-free scale 0).
            uncond_scales="0,1,10",
            cfg_scales="2,4",  # classifier-free guidance (1 = conditional), no classifier
            # A fast sampler beside DDPM-25 (docs/sampling.md's sampler table picks it):
            # conditional model, classifier scale fast_scale, NFE fast_steps. SDE-DPM-Solver++
            # (2M) with x_0 clipped to [-1, 1]; without the clip it diverges at 10 NFE on this
            # model's cosine schedule.
            fast_sampler="dpmpp_2m_sde",
            fast_x0_correction="clip",
            fast_steps="10,20",
            fast_scale=1.0,
            # Classifier-free guidance at interval_scales only while sigma is in
            # guidance_interval ("lo,hi"; Kynkaanniemi et al. 2024), beside the cfg row.
            guidance_interval="0.3,5",
            interval_scales="4",
            # Inpainting (RePaint, DDPM-25 with jumps): the held-out digits with inpaint_mask
            # kept, the rest filled towards another digit; "" skips the row.
            inpaint_mask="half",
            inpaint_scale=4.0,
            inpaint_jump_length=5,
            inpaint_jump_n_sample=3,
            # --config.demo.sampler_table=True adds every sampler x NFE (docs/sampling.md).
            sampler_table=False,
            # "name" (its own x_0 correction) or "name:clip" / ":threshold" / ":none".
            table_samplers="ddpm,ddim,dpm++,dpm++:clip,unipc,heun,euler_ancestral,dpmpp_2m,"
            "dpmpp_2m_sde,dpmpp_2m_sde:clip",
            table_nfe="10,20,50",
            table_samples=300,  # per point (the table rows above use sample.num_samples)
        )
    )
    return config
