"""ImageNet 512x512, class-conditional ADM (released ``512x512_diffusion.pt``; ADM-G FID 7.72
with ``classifier512`` at scale 4.0).

Architecture: README MODEL_FLAGS of 512x512_diffusion.pt: the 256x256 flags with image size
512 and without fp16 (558,997,638 parameters).
Recipe: paper App. I / Table 11: linear schedule, no dropout, AdamW lr 1e-4, batch 256,
EMA 0.9999, 1940K steps.

    python -m adm_jax.main --config=configs/imagenet512.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-256 (128 chips), fsdp 8, remat -> ~5.5 days for 1940K steps
(estimate from the published forward FLOPs at 35% MFU, not measured; the paper reports
1914 V100-days).

Memory (XLA's TPU compiler, no TPU; docs/benchmarks.md): with remat, 32 per chip fits v5p-8
at 67.4 of 95 GiB and 64 per chip does not (two microbatches or a v5p-16 for batch 256).
"""

from configs import imagenet256


def get_config():
    config = imagenet256.get_config()
    config.model.image_size = 512
    config.model.use_fp16 = False
    config.data.image_size = 512
    config.train.num_steps = 1_940_000
    config.train.fsdp = 8
    config.train.remat = "full"
    config.sample.classifier_scale = 4.0
    return config
