"""The largest per-device train batch that fits in device memory, from compiled programs'
memory analysis only (nothing is allocated or run)."""

from __future__ import annotations

from collections.abc import Callable

from adm_jax.benchmark.devices import NOT_AVAILABLE, device_memory_limit, memory_analysis
from adm_jax.benchmark.train_step import compile_train_step, train_setup


def find_max_batch(
    fits: Callable[[int], bool],
    *,
    start: int = 1,
    limit: int = 1024,
    resolution: float = 0.0,
    max_probes: int | None = None,
) -> dict:
    """Largest b in [1, limit] with fits(b), assuming fits is monotone: from ``start``,
    doubling while it fits (halving while it does not), then bisection until the bracket is
    within max(1, resolution * lo). At most ``max_probes`` calls (each may be a compile of
    minutes): then the bracket reached so far comes back with "exact" False. Returns
    {"max_batch", "first_failing", "probes": [(b, fits)], "exact"}; max_batch 0 if even 1 fails
    (or nothing that fits was found within the probes)."""
    probes = []

    def probe(b):
        ok = bool(fits(b))
        probes.append((b, ok))
        return ok

    def budget():
        return max_probes is None or len(probes) < max_probes

    def close(lo, hi):
        return lo > 0 and hi - lo <= max(1, int(resolution * lo))

    lo, hi = 0, None  # largest known to fit (0: none), smallest known to fail (None: none)
    if probe(min(max(1, start), limit)):
        lo = probes[-1][0]
    else:
        hi = probes[-1][0]
    while budget() and (hi is None or lo == 0):
        if hi is None:  # everything so far fits: double up to the limit
            nxt = min(lo * 2, limit)
            if nxt == lo:
                break
        elif hi == 1:  # nothing fits
            break
        else:  # nothing fits yet: halve down
            nxt = hi // 2
        if probe(nxt):
            lo = nxt
        else:
            hi = nxt
    while budget() and hi is not None and lo > 0 and not close(lo, hi):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    exact = (
        (hi is None and lo == limit) or (hi == 1 and lo == 0) or (hi is not None and close(lo, hi))
    )
    return {"max_batch": lo, "first_failing": hi, "probes": probes, "exact": bool(exact)}


def max_batch(
    config,
    mesh,
    *,
    device_memory_bytes: int | None = None,
    limit: int = 1024,
    resolution: float = 1 / 16,
) -> dict:
    """Largest per-device train batch whose compiled step fits ``device_memory_bytes``
    (default: the device's ``bytes_limit``), from ``compiled.memory_analysis()`` only."""
    memory = device_memory_bytes or device_memory_limit()
    if memory is None:
        return {
            "max_batch_per_device": NOT_AVAILABLE,
            "reason": "the backend reports no device memory limit (pass --device_memory_gb)",
        }
    sizes = {}

    def fits(b):
        setup = train_setup(config, mesh, b)
        _, compiled, _, compile_s = compile_train_step(setup)
        mem = memory_analysis(compiled)
        if mem is None:
            raise NotImplementedError("compiled.memory_analysis() is not available")
        sizes[b] = {"total_bytes": mem["total_bytes"], "compile_s": compile_s}
        return mem["total_bytes"] <= memory

    try:
        found = find_max_batch(fits, limit=limit, resolution=resolution)
    except NotImplementedError as err:
        return {"max_batch_per_device": NOT_AVAILABLE, "reason": str(err)}
    return {
        "max_batch_per_device": found["max_batch"],
        "first_failing_batch_per_device": found["first_failing"],
        "device_memory_bytes": memory,
        "search_limit": limit,
        "bytes_by_batch": {str(b): v for b, v in sorted(sizes.items())},
        "probes": found["probes"],
    }
