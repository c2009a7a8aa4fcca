"""ImageNet 128 -> 512 upsampler (released ``128_512_upsampler.pt``; paper FID 3.85 for the
two-stage ADM-G + ADM-U at 512).

Architecture: README MODEL_FLAGS of 128_512_upsampler.pt (308,835,270 parameters). Recipe:
paper App. I (upsampler table): linear schedule, no dropout, AdamW lr 1e-4, batch 256,
EMA 0.9999, 1050K steps.

    python -m adm_jax.main --config=configs/upsample128_512.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-256 (128 chips), fsdp 8, remat -> ~3.8 days for 1050K steps
(estimate from the published forward FLOPs at 35% MFU, not measured).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = default.superres_model(
        large_size=512,
        small_size=128,
        num_channels=192,
        num_res_blocks=2,
        num_head_channels=64,
        learn_sigma=True,
        class_cond=True,
        attention_resolutions="32,16",
        resblock_updown=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    )
    config.diffusion.noise_schedule = "linear"
    config.data.image_size = 512
    config.data.class_cond = True
    config.train.lr = 1e-4
    config.train.batch_size = 256
    config.train.num_steps = 1_050_000
    config.train.fsdp = 8
    config.train.remat = "full"
    return config
