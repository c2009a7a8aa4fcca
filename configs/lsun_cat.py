"""LSUN cat 256x256, unconditional ADM (released ``lsun_cat.pt``; paper FID 5.57).

Architecture: README MODEL_FLAGS of the LSUN checkpoints (552,814,086 parameters, dropout
0.1). Recipe: paper App. I / Table 11: linear schedule, AdamW lr 1e-4, batch 256,
EMA 0.9999, 200K steps for cat. Sample with 1000 steps (README: best samples).

    python -m adm_jax.main --config=configs/lsun_cat.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-128 (64 chips), fsdp 4 -> ~0.6 days (estimate from the published
forward FLOPs at 35% MFU, not measured).
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
        class_cond=False,
        attention_resolutions="32,16,8",
        dropout=0.1,
        resblock_updown=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    )
    config.diffusion.noise_schedule = "linear"
    config.data.name = "lsun/cat"
    config.data.image_size = 256
    config.data.class_cond = False
    config.data.eval_split = ""
    config.train.lr = 1e-4
    config.train.batch_size = 256
    config.train.num_steps = 200_000
    config.train.fsdp = 4
    config.sample.timestep_respacing = "1000"
    config.sample.classifier_scale = 0.0
    return config
