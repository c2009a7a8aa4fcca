"""LSUN bedroom 256x256, unconditional ADM (released ``lsun_bedroom.pt``; paper FID 1.90).

Architecture: README MODEL_FLAGS of the LSUN checkpoints: the unconditional 256x256 flags
with dropout 0.1 (552,814,086 parameters).
Recipe: paper App. I / Table 11: linear schedule, AdamW lr 1e-4, batch 256, EMA 0.9999,
500K steps for bedroom. Sample with 1000 steps (README: best samples).

    python -m adm_jax.main --config=configs/lsun_bedroom.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-128 (64 chips), fsdp 4 -> ~1.6 days (estimate from the published
forward FLOPs at 35% MFU, not measured).
"""

from configs import imagenet256_uncond


def get_config():
    config = imagenet256_uncond.get_config()
    config.model.dropout = 0.1
    config.data.name = "lsun/bedroom"
    config.data.eval_split = ""
    config.train.num_steps = 500_000
    config.sample.timestep_respacing = "1000"
    config.sample.classifier_scale = 0.0
    return config
