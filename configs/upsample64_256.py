"""ImageNet 64 -> 256 upsampler (released ``64_256_upsampler.pt``; paper FID 3.94 for the
two-stage ADM-G + ADM-U).

Architecture: README MODEL_FLAGS of 64_256_upsampler.pt (311,795,910 parameters); the
low-resolution input is the area-downsampled training image (reference
``super_res_train.py``). Recipe: paper App. I (upsampler table): linear schedule, no dropout,
AdamW lr 1e-4, batch 256, EMA 0.9999, 500K steps.

    python -m adm_jax.main --config=configs/upsample64_256.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-128 (64 chips), fsdp 4 -> ~0.9 days for 500K steps (estimate from
the published forward FLOPs at 35% MFU, not measured).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = default.superres_model(
        large_size=256,
        small_size=64,
        num_channels=192,
        num_res_blocks=2,
        num_heads=4,
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
    config.train.num_steps = 500_000
    config.train.fsdp = 4
    return config
