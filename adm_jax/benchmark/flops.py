"""FLOP counts: analytic (2 x multiply-accumulates of every convolution and matmul in a jaxpr,
torch.utils.flop_counter's convention), XLA's cost analysis of a compiled program, and the
reference's published counts of its released models."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable

import jax

from adm_jax.models import abstract_params, example_inputs
from adm_jax.recipe import config as config_lib
from adm_jax.train import metrics as train_metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


# The reference's parameter and FLOP counts of the released models (in a clone of the repository).
PUBLISHED_MODELS = REPO_ROOT / "tests" / "golden" / "published_models.json"

# Peak dense bf16 FLOP/s per JAX device keyed on device_kind prefixes. The table itself lives
# in adm_jax.train.metrics (the train loop logs MFU from it); it covers TPU v4, v5e ("TPU v5
# lite"), v5p ("TPU v5"), v6e ("TPU v6 lite"), A100, H100 and H200 (SXM datasheet figures).
PEAK_BF16_FLOPS = train_metrics.PEAK_FLOPS


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
    """2 x multiply-accumulates of every convolution and dot_general in a jaxpr (scan bodies
    times their length, the costlier branch of a cond), as torch.utils.flop_counter counts."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            out = eqn.outvars[0].aval
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (O, I, spatial...)
            taps = math.prod(rhs.shape[d] for d in rhs_spec[2:]) * rhs.shape[rhs_spec[1]]
            total += 2.0 * math.prod(out.shape) * taps
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            out = eqn.outvars[0].aval
            total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
        else:
            subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
            if not subs:
                continue
            if name == "cond":
                total += max(jaxpr_flops(j) for j in subs)
            else:
                mult = eqn.params.get("length", 1) if name == "scan" else 1
                total += mult * sum(jaxpr_flops(j) for j in subs)
    return total


def analytic_flops(fn: Callable, *args, **kwargs) -> float:
    """Convolution + matmul FLOPs of ``fn(*args)`` from its jaxpr (args may be abstract)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def forward_flops_per_image(module) -> float:
    """Analytic FLOPs of one forward pass of ``module`` at batch 1 (abstract params: nothing
    is allocated). Comparable with published_models.json's ``flops_forward_batch1``."""
    params = abstract_params(module)
    (x, t), kwargs = example_inputs(module, 1)

    def fwd(p, x, t, kw):
        return module.apply({"params": p}, x, t, **kw)

    return analytic_flops(fwd, params, x, t, kwargs)


def xla_flops(compiled_or_lowered) -> float | None:
    """``cost_analysis()["flops"]`` of a Compiled or Lowered program; None if unavailable."""
    flops = train_metrics.compiled_flops(compiled_or_lowered)
    return None if math.isnan(flops) else flops


def published_entry(config) -> dict | None:
    """The published_models.json entry whose constructor args match config.model."""
    if not PUBLISHED_MODELS.exists():
        return None
    ours = config_lib.model_kwargs(config)
    kind = {"unet": "diffusion", "superres": "super_resolution", "classifier": "classifier"}
    keys = (
        "image_size", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
        "channel_mult", "num_classes", "num_head_channels",
    )  # fmt: skip
    with open(PUBLISHED_MODELS) as f:
        models = json.load(f)["models"]
    for entry in models:
        if entry["kind"] != kind[config.model.kind]:
            continue
        ref = dict(entry.get("unet_constructor_args") or entry.get("encoder_constructor_args"))
        ref.setdefault("image_size", entry["resolved_args"].get("image_size"))
        same = True
        for k in keys:
            if k in ref and k in ours:
                a, b = ref[k], ours[k]
                a = tuple(a) if isinstance(a, list) else a
                b = tuple(b) if isinstance(b, list) else b
                if k == "attention_resolutions":
                    a, b = tuple(sorted(a)), tuple(sorted(b))
                same &= a == b
        if same:
            return entry
    return None


def cost_analysis(compiled) -> dict:
    """XLA's cost analysis of a compiled per-device program: "flops", "bytes accessed" and, for
    TPU, "optimal_seconds" (the compiler's cost-model estimate of its run time)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - NotImplementedError on some backends
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    keys = ("flops", "bytes accessed", "optimal_seconds", "transcendentals")
    return {k: float(v) for k, v in (cost or {}).items() if k in keys}
