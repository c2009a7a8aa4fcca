"""ImageNet 128x128, class-conditional ADM (released ``128x128_diffusion.pt``; ADM-G FID 2.97
with ``classifier128`` at scale 0.5).

Architecture: README MODEL_FLAGS of 128x128_diffusion.pt (421,529,606 parameters).
Recipe: paper App. I / Table 11 and README TRAIN_FLAGS "--lr 1e-4 --batch_size 256": linear
schedule, no dropout, AdamW lr 1e-4, batch 256, EMA 0.9999, 4360K steps.

    python -m adm_jax.main --config=configs/imagenet128.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-128 (64 chips) -> ~3.9 days for 4360K steps (estimate from the
published forward FLOPs at 35% MFU, not measured).

Memory (XLA's TPU compiler, no TPU; docs/benchmarks.md): at the paper's batch 256 on an
8-core slice, 36.7 GiB per chip on v5p-8 (64 per chip), 30.4 of 32 on v4-8, 15.6 of 16 on v5e-8.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = default.unet_model(
        image_size=128,
        num_channels=256,
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
    config.data.image_size = 128
    config.data.class_cond = True
    config.train.lr = 1e-4
    config.train.batch_size = 256
    config.train.num_steps = 4_360_000
    config.sample.classifier_scale = 0.5
    return config
