"""Benchmarks of the real train step and samplers on fake data: throughput, FLOPs, MFU, memory.

``adm_jax.bench`` is the command line; these modules are importable so a notebook or a test
calls the same functions (``runner.run(config, ...)`` runs what the command runs):

- ``timing.train_benchmark``: the project's own train state (``adm_jax.train.state``) and
  jitted, sharded, donated train step (``adm_jax.train.steps``, jitted exactly as
  ``adm_jax.train.loop`` does; built by ``train_step.train_setup``) on a fixed fake batch (no
  input pipeline, as flax/examples' fake_data_benchmark). Compile time, median step time,
  images/s, XLA's FLOPs of the compiled per-device program, MFU against the device's peak
  bf16 FLOP/s, peak memory.
- ``sampling.sample_benchmark``: the program ``--mode=sample`` compiles (``BatchSampler``: one
  ``lax.scan``) for any sampler of ``adm_jax.diffusion.methods.SAMPLERS`` at any NFE, with the
  config's ``sample.*`` options, unguided, classifier-guided and with classifier-free
  guidance: time per image and per model evaluation; the guidance overhead is the ratio of
  guided to unguided time per evaluation.
- ``batch_search.max_batch``: the largest per-device train batch whose compiled program fits
  in device memory according to ``compiled.memory_analysis()``, by doubling then bisection,
  compiling only (nothing is allocated or executed).
- ``train_step.flops_report``: compile-only FLOPs per image of a train step (feasible on a CPU
  for the ImageNet configs), next to an analytic count and the reference's published forward
  FLOPs.
- ``aot.aot_report``: the train step and the sampling program compiled for a Cloud TPU slice
  (``topology``) without a TPU: per-chip HBM, fit, largest batch, XLA's step-time estimate.
- ``report.format_table`` / ``report.to_json``: the printed summary and the JSON.

Two FLOP counts appear everywhere (``flops``):
  * ``xla``: ``compiled.cost_analysis()["flops"]`` of the per-device program, divided by the
    per-device batch. It counts every op (elementwise, normalisation, optimizer, remat
    recomputation) and XLA counts a padded convolution's valid taps only.
  * ``model``: 3 x the analytic forward FLOPs (2 per multiply-accumulate of every convolution
    and matmul in the forward jaxpr, the convention of torch.utils.flop_counter that
    ``published_models.json`` uses): forward + backward, no elementwise ops, no recompute.
``mfu`` uses the first (what XLA executes), ``mfu_model`` the second (the usual MFU).
"""
