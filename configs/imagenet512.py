"""ImageNet 512x512, class-conditional ADM (released ``512x512_diffusion.pt``; ADM-G FID 7.72
with ``classifier512`` at scale 4.0).

Architecture: README MODEL_FLAGS of 512x512_diffusion.pt (558,997,638 parameters; the README
trains it without fp16). Recipe: paper App. I / Table 11: linear schedule, no dropout, AdamW
lr 1e-4, batch 256, EMA 0.9999, 1940K steps.

    python -m adm_jax.main --config=configs/imagenet512.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-256 (128 chips), fsdp 8, remat -> ~5.5 days for 1940K steps
(estimate from the published forward FLOPs at 35% MFU, not measured; the paper reports
1914 V100-days).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = default.unet_model(
        image_size=512,
        num_channels=256,
        num_res_blocks=2,
        num_head_channels=64,
        learn_sigma=True,
        class_cond=True,
        attention_resolutions="32,16,8",
        resblock_updown=True,
        use_fp16=False,
        use_scale_shift_norm=True,
    )
    config.diffusion.noise_schedule = "linear"
    config.data.image_size = 512
    config.data.class_cond = True
    config.train.lr = 1e-4
    config.train.batch_size = 256
    config.train.num_steps = 1_940_000
    config.train.fsdp = 8
    config.train.remat = True
    config.sample.classifier_scale = 4.0
    return config
