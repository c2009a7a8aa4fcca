"""Timed runs of ``--mode=sample``'s program (``BatchSampler``) for each sampler, unguided,
classifier-guided and with classifier-free guidance: time per image and per model evaluation,
and the guidance overhead."""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adm_jax import recipe
from adm_jax.batch_sampler import BatchSampler
from adm_jax.benchmark.devices import NA
from adm_jax.benchmark.flops import forward_flops_per_image
from adm_jax.benchmark.timing import timed_calls
from adm_jax.benchmark.train_step import zeros_like_tree
from adm_jax.diffusion import karras, methods
from adm_jax.models import abstract_params, example_inputs
from adm_jax.recipe import config as config_lib
from adm_jax.recipe.train import train_fields


def _params(module, init: str, mesh):
    rep = NamedSharding(mesh, P())
    if init == "zeros":
        abstract = abstract_params(module)
        return zeros_like_tree(abstract, jax.tree.map(lambda _: rep, abstract))

    def init_fn(key):
        args, kwargs = example_inputs(module)
        return module.init(key, *args, **kwargs)["params"]

    return jax.jit(init_fn, out_shardings=rep)(jax.random.PRNGKey(0))


GUIDANCE_KINDS = ("none", "classifier", "cfg")


def cfg_module(config, dtype):
    """The config's class-conditional UNet with the null-label row classifier-free guidance
    needs (built as label-dropout training builds it)."""
    config = copy.deepcopy(config)
    if config_lib.class_dropout_prob(config) == 0:
        config.model.class_dropout_prob = 0.1
    return config_lib.build_model(config, dtype=config_lib.DTYPES[dtype], remat=False)


def sampler_specs(sample_config, samplers: Sequence[str]) -> list[methods.SamplerSpec]:
    """Each of ``samplers`` as ``--mode=sample`` runs it: a name of
    ``adm_jax.diffusion.methods.SAMPLERS`` with a step count ("heun20", "dpmpp_2m_sde10",
    "ddim25"; a bare number is DDPM respaced to it) or a bare name (``sample.steps``), with
    the options of ``sample_config`` (eta, sigma_grid, s_churn, unipc_variant, ...), through
    ``methods.sampler_spec``. A bad name is a one-line ValueError listing the valid ones."""
    specs = []
    for text in samplers:
        name = str(text).strip().lower()
        if name in methods.SAMPLERS:
            overrides = {"sampler": name}
        else:
            tag = recipe.parse_sampler(text, field="--samplers")
            # ddpm/ddim: steps 0 and the tag's respacing ("250", "ddim25"); solvers: steps.
            overrides = {
                "sampler": tag.name,
                "steps": tag.steps,
                "timestep_respacing": tag.respacing,
            }
        # An explicit sampler replaces use_ddim (the old spelling of "ddim"), as in the sweep.
        specs.append(recipe.sampler_spec(sample_config, use_ddim=False, **overrides))
    return specs


def batch_sampler(config, diffusion, net, spec, *, mesh, batch: int, guidance: str, classifier):
    """``--mode=sample``'s ``BatchSampler`` (one compiled ``lax.scan`` over the sampler's steps)
    for ``net``; ``guidance``: "none", "classifier" (guided by ``classifier``) or "cfg"
    (``net`` carries the null label)."""
    size = config_lib.model_image_size(config)
    return BatchSampler.for_networks(
        diffusion,
        net,
        classifier=classifier if guidance == "classifier" else None,
        cfg=guidance == "cfg",
        image_shape=(size, size, int(config.data.channels)),
        batch_size=batch,
        mesh=mesh,
        clip_denoised=bool(recipe.config_get(config.sample, "clip_denoised", True)),
        method=spec,
    )


def model_evaluations(spec: methods.SamplerSpec, diffusion) -> int:
    """Network evaluations per image (NFE): the spec's steps, but for EDM Heun 2 per step
    except the last, counted from its plan (``karras.karras_plan``)."""
    if spec.name not in karras.SAMPLERS:
        return spec.steps
    plan = karras.karras_plan(
        diffusion,
        sampler=spec.name,
        steps=spec.steps,
        sigma_grid=spec.sigma_grid,
        s_churn=spec.s_churn,
    )
    return len(plan["denoiser_sigmas"])


def _time_program(sampler, args, *, mesh, repeats: int, diffusion) -> dict:
    """Compile time and the median of ``repeats`` timed runs (after one warm-up) of one
    sampling program, per batch, image, step and model evaluation."""
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = sampler.program.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        times, out = timed_calls(functools.partial(compiled, *args), repeats=repeats, warmup=1)
    total = statistics.median(times)
    steps, batch = sampler.method.steps, sampler.batch_size
    nfe = model_evaluations(sampler.method, diffusion)
    return {
        "sampler": sampler.method.label,
        "tag": sampler.method.tag,
        "method": sampler.method.name,
        "options": sampler.method.options(),
        "nfe": nfe,
        "num_steps": steps,
        "batch": batch,
        "compile_s": compile_s,
        "time_s": total,
        "times_s": times,
        # A step is one batched model evaluation with its guidance work (Heun: two).
        "per_step_s": total / steps,
        "per_eval_s": total / nfe,
        "per_image_s": total / batch,
        "per_eval_per_image_s": total / nfe / batch,
        "images_per_s": batch / total,
        "images_per_s_per_device": batch / total / mesh.size,
        "images_nonconstant": bool(np.ptp(np.asarray(out)) > 0),
    }


def _guidance_overhead(runs: list[dict]) -> dict:
    """Per sampler tag: guided / unguided time per evaluation, by guidance kind."""
    overhead = {}
    for tag in dict.fromkeys(r["tag"] for r in runs):
        by = {r["guidance"]: r for r in runs if r["tag"] == tag}
        if "none" in by and len(by) > 1:
            base = by["none"]["per_step_s"]
            overhead[tag] = {k: r["per_step_s"] / base for k, r in by.items() if k != "none"}
    return overhead


def sample_benchmark(
    config,
    mesh,
    *,
    classifier_config=None,
    batch_per_device: int = 8,
    samplers: Sequence[str] = ("ddpm250", "ddim25", "dpm++20"),
    repeats: int = 3,
    classifier_scale: float = 1.0,
    cfg_scale: float = 3.0,
    guidance: Sequence[str] = GUIDANCE_KINDS,
    dtype: str | None = None,
    init: str = "real",
) -> dict:
    """Time per image and per model evaluation of each sampler (``sampler_specs``: "ddpm250",
    "ddim25", "dpm++20", "heun10", ...), unguided, classifier-guided (with
    ``classifier_config``) and with classifier-free guidance (class-conditional models),
    through ``BatchSampler``: the program ``--mode=sample`` compiles. Guidance overhead =
    guided / unguided time per evaluation."""
    dtype = dtype or train_fields(config)["dtype"]
    unknown = sorted(set(guidance) - set(GUIDANCE_KINDS))
    if unknown:
        raise ValueError(f"sample_guidance: unknown {unknown}; expected {GUIDANCE_KINDS}")
    specs = sampler_specs(config.sample, samplers)
    model = config_lib.build_model(config, dtype=config_lib.DTYPES[dtype], remat=False)
    params = _params(model, init, mesh)
    class_cond = getattr(model, "num_classes", None) is not None
    classifier = cls_params = None
    if classifier_config is not None and "classifier" in guidance:
        classifier = config_lib.build_model(
            classifier_config, dtype=config_lib.DTYPES[dtype], remat=False
        )
        cls_params = _params(classifier, init, mesh)
    cfg_model = cfg_params = None
    if class_cond and "cfg" in guidance:
        cfg_model = cfg_module(config, dtype)
        cfg_params = _params(cfg_model, init, mesh)
    batch = batch_per_device * mesh.size
    num_classes = getattr(model, "num_classes", None) or getattr(classifier, "out_channels", 1000)
    labels = np.random.default_rng(0).integers(0, num_classes, batch).astype(np.int32)
    variants = [
        (kind, net, net_params)
        for kind, net, net_params in (
            ("none", model, params),
            ("classifier", model if classifier is not None else None, params),
            ("cfg", cfg_model, cfg_params),
        )
        if kind in guidance and net is not None
    ]
    runs = []
    for spec in specs:
        diffusion = config_lib.build_diffusion(config, timestep_respacing=spec.respacing)
        for kind, net, net_params in variants:
            guided = kind == "classifier"
            sampler = batch_sampler(
                config, diffusion, net, spec, mesh=mesh, batch=batch, guidance=kind,
                classifier=classifier,
            )  # fmt: skip
            args = sampler.arguments(
                net_params,
                seed=1,
                batch_index=0,
                labels=labels if sampler.needs_labels else None,
                classifier_params=cls_params if guided else None,
                classifier_scale=classifier_scale if guided else 0.0,
                cfg_scale=cfg_scale if kind == "cfg" else None,
            )
            run = _time_program(sampler, args, mesh=mesh, repeats=repeats, diffusion=diffusion)
            runs.append({**run, "guidance": kind, "guided": kind != "none"})
    fwd = forward_flops_per_image(model)
    cls_fwd = forward_flops_per_image(classifier) if classifier is not None else None
    # Convolution/matmul FLOPs of a guided evaluation over an unguided one: the classifier's
    # forward plus its input gradient (about one more forward) on top of the UNet forward;
    # classifier-free guidance runs the UNet on a doubled batch.
    expected = {}
    if cls_fwd:
        expected["classifier"] = (fwd + 2.0 * cls_fwd) / fwd
    if cfg_model is not None:
        expected["cfg"] = 2.0
    return {
        "dtype": dtype,
        "init": init,
        "batch_per_device": batch_per_device,
        "classifier_scale": classifier_scale,
        "cfg_scale": cfg_scale,
        "guided": classifier is not None,
        "guidance_kinds": [kind for kind, _, _ in variants],
        "runs": runs,
        "guidance_overhead": _guidance_overhead(runs) or NA,
        "guidance_overhead_flops_estimate": expected or NA,
        "model_forward_flops_per_image": fwd,
        "classifier_forward_flops_per_image": cls_fwd or NA,
    }
