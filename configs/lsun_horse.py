"""LSUN horse 256x256, unconditional ADM (released ``lsun_horse.pt``; paper FID 2.57).

The LSUN bedroom config (same README MODEL_FLAGS, 552,814,086 parameters, dropout 0.1, same
recipe) on ``lsun/horse`` for 250K steps (paper App. I / Table 11).

    python -m adm_jax.main --config=configs/lsun_horse.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-128 (64 chips), fsdp 4 -> ~0.8 days (estimate from the published
forward FLOPs at 35% MFU, not measured).
"""

from configs import lsun_bedroom


def get_config():
    config = lsun_bedroom.get_config()
    config.data.name = "lsun/horse"
    config.train.num_steps = 250_000
    return config
