"""Tiny 16x16 models for tests and smoke runs on one CPU (seconds per hundred steps).

``configs/tiny.py`` is a class-conditional learned-sigma UNet (32 channels, dropout 0.1);
``configs/tiny.py:classifier`` is its noisy classifier. Both read the TFDS dataset
``tiny_images`` (16x16 RGB, labels < 1000) that tests build from PNGs with
``adm_jax.data.build_image_folder_dataset``:

    python -m adm_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.data.data_dir=/tmp/tfds
    python -m adm_jax.main --mode=train_classifier --config=configs/tiny.py:classifier \
        --workdir=/tmp/tiny_cls --config.data.data_dir=/tmp/tfds

Hardware / time: a CPU, ~1 minute for the default 40 steps including compilation. The mesh is
(data 4, fsdp 2), so it needs 8 devices: on a CPU simulate them with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (what the tests set), or run on one
device with ``--config.train.fsdp=1``.
"""

from configs import default


def get_config(variant: str = "unet"):
    if variant == "classifier":
        config = default.classifier_config(
            16,
            num_steps=40,
            classifier_width=32,
            classifier_depth=1,
            classifier_attention_resolutions="8",
            channel_mult="1,2",
        )
        config.data.random_crop = False
    elif variant in ("unet", ""):
        config = default.get_config()
        config.model = default.unet_model(
            image_size=16,
            num_channels=32,
            num_res_blocks=1,
            channel_mult="1,2",
            learn_sigma=True,
            class_cond=True,
            attention_resolutions="8",
            num_heads=2,
            dropout=0.1,
            resblock_updown=True,
        )
        config.train.lr = 1e-4
        config.train.num_steps = 40
        config.train.ema_rate = "0.9999,0.9"
    else:
        raise ValueError(f"tiny.py: unknown variant {variant!r}; use 'unet' or 'classifier'")
    config.data.name = "tiny_images"
    config.data.image_size = 16
    config.data.class_cond = True
    config.data.num_workers = 0
    config.data.shuffle_buffer = 64
    config.data.eval_split = "train"
    config.train.batch_size = 8
    config.train.dtype = "float32"
    config.train.fsdp = 2
    config.train.fsdp_min_size = 1024
    config.train.log_every = 10
    config.train.checkpoint_every = 20
    config.train.eval_every = 20
    config.train.eval_batches = 1
    config.train.sample_every = 0 if variant == "classifier" else 40
    config.train.num_sample_images = 4
    config.train.sample_respacing = "ddim4"
    config.train.max_to_keep = 2
    config.sample.batch_size = 4
    config.sample.num_samples = 4
    config.sample.timestep_respacing = "ddim4"
    config.nll.num_samples = 0  # the whole (tiny) split
    config.nll.batch_size = 8
    config.nll.timestep_respacing = "4"
    return config
