"""Noisy ImageNet 512x512 classifier for guidance (released ``512x512_classifier.pt``,
54,448,360 parameters; flags: classifier_defaults(); paired with imagenet512 (scale 4.0)).

Trained on x_t = q_sample(x_0, t) at uniformly random t of the linear schedule with
cross-entropy (reference classifier_train.py --noised True). Recipe: paper App. I and the
README classifier TRAIN_FLAGS: AdamW lr 3e-4, weight decay 0.05, batch 256, linear anneal
to 0, 500K steps (the paper trains classifiers 300K-500K steps).

    python -m adm_jax.main --mode=train_classifier --config=configs/classifier512.py \
        --workdir=$WORKDIR --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-64 -> ~0.3 days (estimate from the published forward FLOPs at 35%
MFU, not measured).

Memory (XLA's TPU compiler, no TPU; docs/benchmarks.md): 42.5 of 95 GiB per chip on v5p-8 at
64 per chip; it does not fit v4-8 at 64 per chip.
"""

from configs import default


def get_config():
    return default.classifier_config(512, num_steps=500_000, noise_schedule="linear")
