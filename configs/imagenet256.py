"""ImageNet 256x256, class-conditional ADM (released ``256x256_diffusion.pt``; ADM-G FID 4.59
with ``classifier256`` at scale 1.0, 5.44 with DDIM-25).

Architecture: README MODEL_FLAGS of 256x256_diffusion.pt (553,838,086 parameters).
Recipe: paper App. I / Table 11: linear schedule, no dropout, AdamW lr 1e-4, batch 256,
EMA 0.9999, 1980K steps.

    python -m adm_jax.main --config=configs/imagenet256.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-128 (64 chips), fsdp 4 -> ~6.4 days for 1980K steps (estimate from
the published forward FLOPs at 35% MFU, not measured).

Memory (XLA's TPU compiler, no TPU; docs/benchmarks.md): at the paper's batch 256, 91.5 of
95 GiB per chip on v5p-8 (64 per chip, fsdp 4); it does not fit v4-8 or v5e-8.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = default.unet_model(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        num_head_channels=64,
        learn_sigma=True,
        class_cond=True,
        attention_resolutions="32,16,8",
        resblock_updown=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    )
    config.diffusion.noise_schedule = "linear"
    config.data.image_size = 256
    config.data.class_cond = True
    config.train.lr = 1e-4
    config.train.batch_size = 256
    config.train.num_steps = 1_980_000
    config.train.fsdp = 4
    config.sample.classifier_scale = 1.0
    return config
