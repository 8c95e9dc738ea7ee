"""Ahead-of-time compilation reports: how sharding is proven for sizes this machine cannot run.

    model = aot.on_mesh(nnx.eval_shape(lambda: build()), mesh, rules)     # shapes + shardings, no memory
    graphdef, state, frozen = step.abstract_train_state(model, tx, trainable=...)
    compiled = train_step.lower(state, batch).compile()
    report = aot.memory_report(compiled)        # XLA's per-device bytes, in GiB
    aot.bytes_per_device(state["params"])       # what a tree holds on one device, from its shardings

Compile for a mesh of simulated devices by setting ``jax.config.update("jax_num_cpu_devices", N)``
before JAX starts its backend.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lib import sharding

GIB = 2 ** 30
_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
           "generated_code_size_in_bytes", "peak_memory_in_bytes")


def on_mesh(abstract: nnx.Module, mesh, rules) -> nnx.Module:
    """An abstract model (``ShapeDtypeStruct`` leaves, e.g. from ``nnx.eval_shape``) whose leaves
    carry the shardings its logical axis names get under ``rules`` on ``mesh``."""
    graphdef, state = nnx.split(abstract)
    shardings = sharding.state_shardings(state, mesh, rules)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state, shardings,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of ``tree``'s arrays / ShapeDtypeStructs (by their shardings; whole
    arrays when they have none)."""
    total = 0
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def memory_report(compiled) -> dict:
    """XLA's memory analysis of a compiled program, per device: each field in bytes and in GiB
    (``*_gib``), and ``total_per_device_*`` = arguments + outputs - aliased (donated) + temporaries."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    out = {}
    for field in _FIELDS:
        value = getattr(mem, field, None)
        if value is not None:
            out[field] = int(value)
            out[field.replace("_in_bytes", "_gib")] = round(value / GIB, 3)
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    out["total_per_device_gib"] = round(total / GIB, 3)
    out["total_per_device_bytes"] = int(total)
    return out
