"""Your own images, from scratch, on one machine: an ADM UNet trained on a folder of images.

The whole walk (images -> dataset -> train -> sample -> reference batch -> FID -> grid) is
docs/own_data.md. In short, for a folder my_images/<class>/*.png of 64x64-or-larger colour
images in 10 classes:

    python -m adm_jax.data.prepare my_images --data_dir=tfds --name=my_images
    python -m adm_jax.main --config=configs/image_folder.py:64 --workdir=runs/my_images \
        --config.data.name=my_images --config.data.data_dir=tfds \
        --config.model.class_cond=True --config.model.num_classes=10
    python -m adm_jax.main --config=configs/image_folder.py:64 --workdir=runs/my_images \
        --config.data.name=my_images --config.data.data_dir=tfds \
        --config.model.class_cond=True --config.model.num_classes=10 --mode=sample

``:SIZE`` (8, 16, 32, 64, 128 or 256; default 64) is the image side; it also picks the UNet's
depth (``ARCHITECTURE_BY_SIZE``). Images of another size are centre-cropped and resized to it.
The model, for 64x64: 101.7M parameters (128 channels, 2 residual blocks per level,
channel_mult 1,2,3,4, attention at 32, 16 and 8 pixels with 64 channels per head, BigGAN
up/down-sampling, learned variances, cosine schedule, dropout 0.1); 75 GFLOP per image
forward, about 230 GFLOP per training image (forward + backward).

Any device count: the mesh is (data = every device, fsdp 1), so one GPU, one host of 8 GPUs
or a CPU all run it; the global batch (64) must be a multiple of the device count.

Hardware / time: NOT measured on a GPU (none was lent to this task). Estimate for one H100
in bfloat16 at 15-35% of its 989 TFLOP/s: 650-1500 training images/s, so the default
100,000 steps of 64 images take about 1.2-2.7 hours, and 10,000 samples of 100 DDPM steps
about 5-15 minutes. Measured on the 2-core CPU of the tests: the "Try it on a CPU" settings
of docs/own_data.md (8x8 images, a 32-channel UNet, 20 steps, 8 samples) run the whole walk
in 76 s idle, 3 to 5 minutes while other jobs share the machine; mostly compilation.

Every override a user needs, together (data.image_size, data.channels and data.class_cond
are the model's own fields: setting either twin sets both):

    the data       --config.data.name=NAME --config.data.data_dir=DIR (what the builder wrote)
    image size     configs/image_folder.py:SIZE; another side: --config.model.image_size with
                   --config.model.channel_mult and --config.model.attention_resolutions
    grey / colour  --config.model.in_channels=1 (grey) or 3 (colour, this config's)
    labels         --config.model.class_cond=True --config.model.num_classes=K (the builder
                   prints K); --config.model.class_dropout_prob=0.1 adds classifier-free
                   guidance (then --config.sample.cfg_scale=2 when sampling)
    model size     --config.model.num_channels=128 (a multiple of 64: 64 channels per head)
                   --config.model.num_res_blocks=2 --config.model.dropout=0.1
    batch / mesh   --config.train.batch_size=64 (global: a multiple of the device count)
                   --config.train.fsdp=1 (> 1 shards the weights over that many devices)
                   --config.train.grad_accum_steps=1 (a larger batch than memory holds)
    optimiser      --config.train.lr=1e-4 --config.train.warmup_steps=0
    length         --config.train.num_steps=100000
    EMA            --config.train.ema_rate=0.9999 (0.999 for runs under ~30K steps)
    intervals      --config.train.log_every=100 --config.train.checkpoint_every=5000
                   --config.train.sample_every=5000 (a PNG grid of 16 EMA samples)
    held-out loss  --config.train.eval_every=5000 (needs the builder's --validation_dir)
    precision      --config.train.dtype=bfloat16 (float32 on a CPU)
    input pipeline --config.data.num_workers=8 --config.data.random_flip=True
    sampling       --config.sample.num_samples=10000 --config.sample.batch_size=256
                   --config.sample.timestep_respacing=100 (DDPM steps)
"""

import ml_collections

from configs import default

# Image side -> (channel_mult, attention_resolutions): one level per halving down to 4-8
# pixels. From 64 up: the reference's multipliers and the paper's attention at 32, 16 and 8
# pixels (Sec. 3); 32: Improved DDPM's CIFAR-10 UNet (attention at 16 and 8); below, the same
# rule on fewer levels.
ARCHITECTURE_BY_SIZE = {
    8: ("1,2", "8"),
    16: ("1,2,2", "16,8"),
    32: ("1,2,2,2", "16,8"),
    64: ("1,2,3,4", "32,16,8"),
    128: ("1,1,2,3,4", "32,16,8"),
    256: ("1,1,2,2,4,4", "32,16,8"),
}
DEFAULT_SIZE = 64


def get_config(image_size: str = "") -> ml_collections.ConfigDict:
    """``configs/image_folder.py[:SIZE]``: SIZE (default 64) picks the UNet's depth."""
    size = int(image_size) if image_size.strip().isdigit() else (image_size or DEFAULT_SIZE)
    if size not in ARCHITECTURE_BY_SIZE:
        raise ValueError(
            f"configs/image_folder.py:{image_size}: expected an image side among "
            f"{sorted(ARCHITECTURE_BY_SIZE)}; for another side use the nearest and override "
            "--config.model.image_size, channel_mult and attention_resolutions"
        )
    channel_mult, attention_resolutions = ARCHITECTURE_BY_SIZE[size]
    config = default.get_config()
    config.model = default.unet_model(
        image_size=size,
        num_channels=128,
        num_res_blocks=2,
        channel_mult=channel_mult,
        attention_resolutions=attention_resolutions,
        num_head_channels=64,  # 64 channels per head (Sec. 3)
        resblock_updown=True,
        use_scale_shift_norm=True,
        learn_sigma=True,
        dropout=0.1,  # a few thousand images overfit without it (Improved DDPM, CIFAR-10)
        class_cond=False,
        in_channels=3,
    )
    config.diffusion.noise_schedule = "cosine"  # ADM's 64x64 schedule; better for small images
    config.diffusion.learn_sigma = True

    d = config.data
    d.name = "my_images"
    d.data_dir = ""
    # One setting each: the data's size, channels and labels are the model's (FieldReferences;
    # an override of either field sets both).
    d.image_size = config.model.get_ref("image_size")
    d.channels = config.model.get_ref("in_channels")
    d.class_cond = config.model.get_ref("class_cond")
    d.random_flip = True
    d.num_workers = 8
    d.shuffle_buffer = 0  # exact global shuffle (random access into the ArrayRecord files)
    d.split = "train"
    d.eval_split = "validation"  # only with eval_every > 0 (builder --validation_dir)

    t = config.train
    t.num_steps = 100_000
    t.batch_size = 64
    t.lr = 1e-4
    t.ema_rate = "0.9999"
    t.fsdp = 1  # the mesh is (data = every device, fsdp 1): any device count
    t.log_every = 100
    t.checkpoint_every = 5_000
    t.max_to_keep = 2
    t.eval_every = 0  # a folder has no validation split unless the builder was given one
    t.sample_every = 5_000
    t.num_sample_images = 16
    t.sample_respacing = "ddim50"

    s = config.sample
    s.num_samples = 10_000
    s.batch_size = 256
    s.sampler = "ddpm"
    s.timestep_respacing = "100"
    s.classifier_scale = 0.0  # no noisy classifier is trained here (configs/default.py has 1)
    return config
