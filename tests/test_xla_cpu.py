"""The entry points' XLA:CPU flags: set without overriding the user's, and in effect (conftest
sets them as the entry points do, before JAX starts)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from adm_jax import xla_cpu


def test_set_cpu_flags_appends_and_keeps_user_choice():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    value = xla_cpu.set_cpu_flags(env)
    assert value == env["XLA_FLAGS"]
    assert value.startswith("--xla_force_host_platform_device_count=8 ")
    for name, setting in xla_cpu.CPU_FLAGS.items():
        assert f"--{name}={setting}" in value
    # Idempotent, and a flag the user set is left as the user set it.
    assert xla_cpu.set_cpu_flags(env) == value
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"}
    assert xla_cpu.set_cpu_flags(user) == "--xla_cpu_experimental_ynn_fusion_type=reduce"
    assert xla_cpu.set_cpu_flags({}) == " ".join(f"--{n}={v}" for n, v in xla_cpu.CPU_FLAGS.items())


def test_convolutions_run_on_eigen_not_ynnpack():
    assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"]
    x = jnp.ones((32, 16, 16, 64))
    w = jnp.ones((3, 3, 64, 64))

    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y * y)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert "convolution(" in hlo
    # Forward, input-gradient and weight-gradient convolutions: none inside a YNNPACK fusion.
    fused = [line for line in hlo.splitlines() if "ynn_fusion" in line and "fusion(" in line]
    called = {line.split("calls=%")[1].split(",")[0] for line in fused if "calls=%" in line}
    for name in called:
        body = hlo.split(f"%{name} ", 1)[1].split("\n}", 1)[0]
        assert "convolution(" not in body, name


def test_use_huge_pages_restarts_with_the_tunable_unless_set_or_switched_off(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(xla_cpu.platform, "libc_ver", lambda: ("glibc", "2.36"))
    calls = []
    env = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=8"}
    argv = ["python", "-m", "adm_jax.bench", "--what=train"]
    assert xla_cpu.use_huge_pages(env, argv, execv=lambda *a: calls.append(a))
    assert calls == [(sys.executable, [sys.executable, "-m", "adm_jax.bench", "--what=train"])]
    # The user's tunables are kept; after the restart nothing happens again.
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1"
    assert not xla_cpu.use_huge_pages(env, argv, execv=lambda *a: calls.append(a))
    # The user's own hugetlb choice wins; ADM_JAX_HUGE_PAGES=0 keeps the process.
    user = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert not xla_cpu.use_huge_pages(user, argv, execv=lambda *a: calls.append(a))
    off = {xla_cpu.HUGE_PAGES_ENV: "0"}
    assert not xla_cpu.use_huge_pages(off, argv, execv=lambda *a: calls.append(a))
    assert len(calls) == 1
    # Where it cannot help: an old glibc, THP "always" or "never", not glibc at all.
    monkeypatch.setattr(xla_cpu.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not xla_cpu.huge_pages_wanted({})
    monkeypatch.setattr(xla_cpu.platform, "libc_ver", lambda: ("", ""))
    assert not xla_cpu.huge_pages_wanted({})
    monkeypatch.setattr(xla_cpu.platform, "libc_ver", lambda: ("glibc", "2.36"))
    for mode in ("always", "never", None):
        monkeypatch.setattr(xla_cpu, "_thp_mode", lambda m=mode: m)
        assert not xla_cpu.huge_pages_wanted({})


@pytest.mark.skipif(not xla_cpu.huge_pages_wanted({}), reason="no glibc >= 2.35 with THP madvise")
def test_use_huge_pages_really_restarts_the_same_process():
    code = (
        "import os, sys; print('start', os.getpid(), flush=True); "
        "from adm_jax import xla_cpu; xla_cpu.use_huge_pages(); "
        "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    ).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    runs = [line for line in out if line.startswith("run")]
    assert len(starts) == 2 and len(runs) == 1, out
    assert starts[0].split()[1] == starts[1].split()[1] == runs[0].split()[1]
    assert runs[0].endswith("glibc.malloc.hugetlb=1")
