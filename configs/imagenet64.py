"""ImageNet 64x64, class-conditional ADM (released ``64x64_diffusion.pt``; paper FID 2.07).

Architecture: the README MODEL_FLAGS of 64x64_diffusion.pt (295,904,454 parameters).
Recipe: paper App. I / Table 11: cosine schedule, dropout 0.1, AdamW lr 3e-4, batch 2048,
EMA 0.9999, 540K steps, hybrid loss with learned sigmas.

    python -m adm_jax.main --config=configs/imagenet64.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-256 (128 chips), batch 2048 -> ~0.7 days for 540K steps
(estimate: 3 x forward FLOPs from golden/published_models.json at 35% MFU, not measured).

Memory (XLA's TPU compiler, no TPU; docs/benchmarks.md): the paper's batch does not fit an
8-chip slice (v5p-8: 256 per chip fits at 91.8 of 95 GiB, 512 does not: use
``train.grad_accum_steps=2`` there).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = default.unet_model(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        learn_sigma=True,
        class_cond=True,
        attention_resolutions="32,16,8",
        num_head_channels=64,
        dropout=0.1,
        resblock_updown=True,
        use_new_attention_order=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    )
    config.diffusion.noise_schedule = "cosine"
    config.data.image_size = 64
    config.data.class_cond = True
    config.train.lr = 3e-4
    config.train.batch_size = 2048
    config.train.num_steps = 540_000
    config.train.fsdp = 1
    config.sample.timestep_respacing = "250"
    config.sample.classifier_scale = 1.0
    return config
