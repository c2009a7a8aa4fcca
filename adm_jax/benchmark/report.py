"""A benchmark run's result as text: the summary table ``adm_jax.bench`` prints, markdown tables
of the TPU-slice fits, and JSON."""

from __future__ import annotations

import json

import numpy as np


def _fmt(v, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v / scale:.{digits}g}{unit}"


def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def _max_batch_cell(m: dict | None) -> str:
    """ "37" when the search closed, "32-47" (fits, first failing - 1) or "<16" otherwise."""
    if not m:
        return "-"
    lo, hi = m["max_batch_per_chip"], m["first_failing_batch_per_chip"]
    if m["exact"] or hi is None:
        return str(lo)
    return f"<{hi}" if lo == 0 else f"{lo}-{hi - 1}"


def _mem_cells(part: dict, hbm: int) -> str:
    mem = part["memory"]
    if mem is None:  # the compiler refused it: what it said the program needs
        return f"- | - | >{_gib(part['hbm_required_bytes'])} / {hbm / 2**30:.0f} (compiler: OOM)"
    return (
        f"{_gib(mem['argument_bytes'])} | {_gib(mem['temp_bytes'])} "
        f"| {_gib(mem['total_bytes'])} / {hbm / 2**30:.0f}"
    )


def _estimate_cell(part: dict, digits: int) -> str:
    """XLA's estimate in ms; "rejected" when ``_checked_estimate`` refused the compiler's
    value (the reason is in the JSON)."""
    if part.get("xla_estimate_rejected"):
        return "rejected"
    est = part.get("xla_estimated_seconds")
    return _fmt(est * 1e3 if est else None, "", 1, digits)


def format_aot(aot: dict, label: str = "") -> str:
    """Markdown tables (train step, sampling) of ``aot_report``'s result; ``label`` names the
    model in a first column (several reports then concatenate into one table)."""
    first = "| model " if label else ""
    cell = f"| {label} " if label else ""
    train = [
        f"{first}| slice | chips | batch/chip | args GiB | temp GiB | total GiB / HBM | fits "
        "| max batch/chip | GFLOP/chip/step | XLA est. step ms | est. MFU | compile s |",
        ("|---" * (12 + bool(label))) + "|",
    ]
    sample = [
        f"{first}| slice | sampler | guidance | batch/chip | args GiB | temp GiB "
        "| total GiB / HBM | fits | GFLOP/chip/step | XLA est. ms/step | compile s |",
        ("|---" * (11 + bool(label))) + "|",
    ]
    for e in aot["slices"]:
        t, hbm = e["train"], e["hbm_bytes_per_chip"]
        train.append(
            f"{cell}| {e['slice']} | {e['chips']} | {t['batch_per_chip']} "
            f"| {_mem_cells(t, hbm)} | {'yes' if t['fits'] else 'NO'} "
            f"| {_max_batch_cell(e.get('max_batch'))} "
            f"| {_fmt(t.get('flops_per_chip'), '', 1e9, 4)} "
            f"| {_estimate_cell(t, 4)} "
            f"| {_fmt(t.get('xla_estimated_mfu_model'), '', 1, 2)} | {t['compile_s']:.0f} |"
        )
        s = e.get("sample")
        if s and "fits" in s:
            sample.append(
                f"{cell}| {e['slice']} | {s['sampler']} | {s['guidance']} | {s['batch_per_chip']} "
                f"| {_mem_cells(s, hbm)} | {'yes' if s['fits'] else 'NO'} "
                f"| {_fmt(s.get('flops_per_chip'), '', 1e9, 4)} "
                f"| {_estimate_cell(s, 3)} | {s['compile_s']:.0f} |"
            )
    lines = train
    if len(sample) > 2:
        lines += [""] + sample
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A readable summary of ``run``'s result."""
    env = result["environment"]
    lines = [
        f"device {env['device_kind']} x{env['num_devices']} ({env['backend']}), jax "
        f"{env['jax_version']}, load {env['load_average']} -> {env.get('load_average_end')}",
    ]
    if "train" in result:
        t = result["train"]
        mem = t["memory"]["peak_bytes_in_use"]
        lines += [
            "",
            f"train step  ({t['dtype']}, batch {t['batch_per_device']}/device, "
            f"global {t['global_batch']}, mesh {t['mesh']})",
            f"  compile            {_fmt(t['compile_s'], ' s')}",
            f"  step time (median) {_fmt(t['step_time_s'] * 1e3, ' ms')}",
            f"  images/s/device    {_fmt(t['images_per_s_per_device'])}",
            f"  forward (median)   {_fmt(t['forward_time_s'], ' ms', 1e-3)}, "
            f"{_fmt(t['forward_images_per_s'])} images/s (inference, same batch)",
            f"  GFLOPs/image       xla {_fmt(t['flops_per_image_xla'], '', 1e9)}, "
            f"model (3x fwd) {_fmt(t['model_flops_per_image'], '', 1e9)}, "
            f"reference fwd {_fmt(t['reference_forward_flops_per_image'], '', 1e9)}",
            f"  TFLOP/s/device     xla {_fmt(t['tflops_per_device_xla'])}, "
            f"model {_fmt(t['tflops_per_device_model'])}",
            f"  MFU                xla {_fmt(t['mfu'])}, model {_fmt(t['mfu_model'])}",
            f"  peak memory        {_fmt(mem, ' MiB', 2**20)} ({t['memory']['source']})",
        ]
    if "flops" in result:
        f = result["flops"]
        lines += [
            "",
            f"train step FLOPs, compile-only ({f['dtype']}, batch {f['batch_per_device']}/device)",
            f"  lower {_fmt(f['lower_s'], ' s')}, compile {_fmt(f['compile_s'], ' s')}",
            f"  GFLOPs/image  xla compiled {_fmt(f.get('flops_per_image_xla'), '', 1e9)}, "
            f"xla lowered {_fmt(f.get('flops_per_image_xla_lowered'), '', 1e9)}, "
            f"model (3x fwd) {_fmt(f['model_flops_per_image'], '', 1e9)}",
            "  forward GFLOPs/image  analytic "
            f"{_fmt(f['forward_flops_per_image_analytic'], '', 1e9)}, "
            f"reference {f['reference_model']}: "
            f"{_fmt(f['reference_forward_flops_per_image'], '', 1e9)}",
        ]
    if "sample" in result and "runs" in result["sample"]:
        s = result["sample"]
        lines += [
            "",
            f"sampling ({s['dtype']}, classifier scale {s['classifier_scale']}, "
            f"cfg scale {s['cfg_scale']})",
            f"  {'sampler':<22} {'guidance':<10} {'NFE':>4} {'batch':>5} {'compile s':>9} "
            f"{'s/eval':>9} {'s/image':>9} {'img/s/dev':>9}",
        ]
        for r in s["runs"]:
            lines.append(
                f"  {r['sampler']:<22} {r['guidance']:<10} {r['nfe']:>4} {r['batch']:>5} "
                f"{r['compile_s']:>9.3g} {r['per_eval_s']:>9.3g} {r['per_image_s']:>9.3g} "
                f"{r['images_per_s_per_device']:>9.3g}"
            )
        ov = s["guidance_overhead"]
        if isinstance(ov, dict):
            flops = s["guidance_overhead_flops_estimate"]
            flops = flops if isinstance(flops, dict) else {}
            lines.append("  guidance overhead (guided / unguided time per evaluation):")
            for tag, ratios in ov.items():
                lines.append(
                    f"    {tag}: "
                    + ", ".join(
                        f"{k} {v:.3g}x (FLOPs {_fmt(flops.get(k))}x)" for k, v in ratios.items()
                    )
                )
    if "aot" in result:
        lines += [
            "",
            f"TPU slices, compile-only ({result['aot']['note']}); MFU = 3 x analytic forward "
            "FLOPs / XLA's estimated step time / peak bf16",
            "",
            format_aot(result["aot"]),
        ]
    if "maxbatch" in result:
        m = result["maxbatch"]
        lines += ["", f"max batch per device: {m['max_batch_per_device']}"]
        if "reason" in m:
            lines.append(f"  ({m['reason']})")
        else:
            lines.append(
                f"  device memory {_fmt(m['device_memory_bytes'], ' GiB', 2**30)}; first failing "
                f"{m['first_failing_batch_per_device']}; probes {m['probes']}"
            )
    return "\n".join(lines)


def to_json(result: dict) -> str:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return str(o)

    return json.dumps(result, indent=2, default=default)
