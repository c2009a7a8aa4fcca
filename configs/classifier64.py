"""Noisy ImageNet 64x64 classifier for guidance (released ``64x64_classifier.pt``, 65,438,568
parameters; flags: --classifier_depth 4; paired with imagenet64 (classifier_sample.py
--classifier_depth 4 --classifier_scale 1.0)).

Trained on x_t = q_sample(x_0, t) at uniformly random t of the cosine schedule with
cross-entropy (reference classifier_train.py --noised True). Recipe: paper App. I and the
README classifier TRAIN_FLAGS: AdamW lr 3e-4, weight decay 0.05, batch 256, linear anneal
to 0, 300K steps (the paper trains classifiers 300K-500K steps).

    python -m adm_jax.main --mode=train_classifier --config=configs/classifier64.py \
        --workdir=$WORKDIR --config.data.data_dir=$TFDS_DIR

Hardware / time: TPU v4-16 -> ~0.1 days (estimate from the published forward FLOPs at 35%
MFU, not measured).

Memory (XLA's TPU compiler, no TPU; docs/benchmarks.md): 10.0 of 95 GiB per chip on v5p-8 at
64 per chip.
"""

from configs import default


def get_config():
    return default.classifier_config(
        64, num_steps=300_000, noise_schedule="cosine", classifier_depth=4
    )
