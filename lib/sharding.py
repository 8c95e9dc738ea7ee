"""Meshes, logical axis names and the rules that map one to the other.

Every parameter in ``lib`` is created through :func:`param`, which records *logical* axis names
(``out_sharding`` metadata) such as ``("kernel_h", "kernel_w", "in_channels", "out_channels")``.
Logical names say what a dimension *is*; a list of rules (from the config) says which mesh axis,
if any, each one is split over. With no rules every parameter is replicated (data parallelism).

Logical axis names used by the library:

===============  ==========================================================================
``kernel_h/w``   spatial taps of a convolution kernel (never worth sharding)
``in_channels``  input features of a conv / linear kernel
``out_channels`` output features of a conv / linear kernel, and its bias
``channels``     per-channel vectors: norm scale/bias, BatchNorm statistics, layer scales
``classes``      the classifier's output dimension
``heads``        a transformer's attention width (qkv outputs, the attention projection's input):
                 tensor parallelism maps it to the model axis (Megatron's column/row split)
``mlp``          a transformer's FFN hidden width (fc1 / SwiGLU w12 outputs, fc2 / w3 inputs)
``batch``        the batch dimension of activations and of input batches
===============  ==========================================================================

Example rules: ``(("batch", "data"),)`` (default, data parallel); FSDP over the data axis:
``(("batch", "data"), ("out_channels", "data"), ("classes", "data"))``; a ViT adds
``("heads", "data"), ("mlp", "data")`` (FSDP) or ``("heads", "model"), ("mlp", "model")`` (tensor parallel). A dimension whose size does
not divide the mesh axis falls back to replication, so the same rules serve every model size.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

LOGICAL_AXES = ("kernel_h", "kernel_w", "in_channels", "out_channels", "channels", "classes", "batch", "heads", "mlp")
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (("batch", "data"),)


def param(value: Any, names: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` carrying logical axis names.

    Eager sharding is off: placement is decided by :func:`state_shardings` from config rules when a
    model is created under a mesh (see ``lib.zoo.create_model``), never implicitly at creation.
    """
    if len(names) != len(value.shape):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for a parameter of shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),), devices=None) -> Mesh:
    """A mesh with ``AxisType.Auto`` on every axis; one size may be -1 ("all remaining devices").

    Auto axes (GSPMD/Shardy propagation) are what sharded convolutions need: the jax 0.12 default
    (Explicit) rejects a conv with an FSDP-sharded kernel at trace time.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {list(axes)}: at most one axis may have size -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if devices.size % known:
            raise ValueError(f"mesh {list(axes)}: {devices.size} devices do not divide by {known}")
        sizes[sizes.index(-1)] = devices.size // known
    if int(np.prod(sizes)) > devices.size:
        raise ValueError(f"mesh {list(axes)} needs {int(np.prod(sizes))} devices, but only {devices.size} exist")
    devices = devices.reshape(-1)[: int(np.prod(sizes))].reshape(sizes)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> P:
    """Map logical names to a PartitionSpec; non-divisible or repeated mesh axes are replicated."""
    if not names:
        return P()
    table = dict(rules)
    spec, used = [], set()
    for name, size in zip(names, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or axis not in mesh.shape or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def state_shardings(state, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    """NamedShardings for an ``nnx.State`` (abstract or concrete) from its logical names."""
    def one(var):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        shape = var.get_value().shape if isinstance(var, nnx.Variable) else np.shape(var)
        return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES,
                   ndim: int = 4) -> NamedSharding:
    """Sharding of an input batch: the leading dimension over the mesh axis of ``batch``."""
    axis = dict(rules).get("batch")
    return NamedSharding(mesh, P(axis, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, rules: Sequence[tuple[str, str | None]], batch):
    """Shardings of any batch pytree: each array's leading dimension over the mesh axis of ``batch``."""
    return jax.tree.map(lambda x: batch_sharding(mesh, rules, np.ndim(x)), batch)


def place(tree, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    """Put any pytree of arrays and nnx Variables on ``mesh``: Variables by their logical names,
    plain arrays replicated; arrays already laid out on ``mesh`` stay where they are."""
    def on_mesh(value) -> bool:
        return isinstance(getattr(value, "sharding", None), NamedSharding) and value.sharding.mesh == mesh

    def one(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            return x if on_mesh(value) else x.replace(jax.device_put(value, state_shardings(x, mesh, rules)))
        return x if on_mesh(x) else jax.device_put(x, NamedSharding(mesh, P()))
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    """Move an existing (concrete) model's state onto ``mesh`` per ``rules``, in place; returns it.

    For models small enough to exist on one host; large models are created sharded instead
    (``lib.zoo.create_model(..., mesh=mesh)``).
    """
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model
