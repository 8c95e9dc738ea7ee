"""Initialisers that reproduce the upstream PyTorch models when training from scratch.

``torch``: PyTorch's own default for ``nn.Conv2d`` / ``nn.Linear``: kaiming-uniform(a=sqrt(5)),
i.e. U(+-sqrt(1/fan_in)) for the kernel and U(+-1/sqrt(fan_in)) for the bias. StarNet,
EfficientMod and Context Clusters keep it for their convs (their ``_init_weights`` tests
``isinstance(m, nn.Linear or nn.Conv2d)``, which is just ``nn.Linear``).

``trunc_normal``: timm's ``trunc_normal_(std=.02)`` with *absolute* bounds +-2 (so at std 0.02
effectively an untruncated normal), bias 0. Upstream linears use it, timm's StarNet uses it for
convs too.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

INIT_SCHEMES = ("torch", "trunc_normal")


def trunc_normal(std: float = 0.02, low: float = -2.0, high: float = 2.0):
    """timm/PyTorch ``trunc_normal_``: bounds are absolute values, not multiples of std."""
    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.truncated_normal(key, low / std, high / std, shape, jnp.float32)).astype(dtype)
    return init


def torch_default_kernel(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def torch_default_bias(fan_in: int):
    return torch_default_kernel(fan_in)


def zeros(key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def fan_out_normal(fan_out: int):
    """``normal_(0, sqrt(2 / fan_out))`` with fan_out = kh*kw*out/groups: the conv init of FCViT's
    ``_init_weights`` (its biases are zero). Used by ``lib.layers.global_context``."""
    std = math.sqrt(2.0 / fan_out)
    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def kernel_and_bias_init(scheme: str, fan_in: int):
    """(kernel_init, bias_init) for an init scheme name in :data:`INIT_SCHEMES`."""
    if scheme == "torch":
        return torch_default_kernel(fan_in), torch_default_bias(fan_in)
    if scheme == "trunc_normal":
        return trunc_normal(0.02), zeros
    raise ValueError(f"unknown init scheme {scheme!r}; expected one of {INIT_SCHEMES}")
