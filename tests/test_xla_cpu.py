"""The entry points' XLA:CPU flags: set without overriding the user's, and in effect (conftest
sets them as the entry points do, before JAX starts)."""

import os

import jax
import jax.numpy as jnp

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
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert xla_cpu.set_cpu_flags(user) == "--xla_cpu_experimental_ynn_fusion_type=dot"
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
