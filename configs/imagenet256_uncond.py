"""ImageNet 256x256, unconditional ADM (released ``256x256_diffusion_uncond.pt``; paper
Table 4: FID 33.03 unguided, 12.00 with ``classifier256`` at scale 10).

Same network and recipe as imagenet256.py without class conditioning
(552,814,086 parameters).

    python -m adm_jax.main --config=configs/imagenet256_uncond.py --workdir=$WORKDIR \
        --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-128 (64 chips), fsdp 4 -> ~6.4 days for 1980K steps (estimate, not
measured).
"""

from configs import imagenet256


def get_config():
    config = imagenet256.get_config()
    config.model.class_cond = False
    config.data.class_cond = False
    config.sample.classifier_scale = 10.0
    return config
