"""Serve a zoo model without its Python code: ``jax.export`` of the inference function.

    blob = export.export_inference(model, batch_shape=(None, 224, 224, 3))   # bytes, any batch size
    logits = export.load_inference(blob)(images)                             # no lib / flax needed to call

The exported function closes over the weights (eval mode: BatchNorm running statistics), so the
serialized bytes are the whole model. ``None`` in ``batch_shape`` makes that dimension symbolic.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def export_inference(model: nnx.Module, batch_shape: Sequence[int | None], *, dtype=jnp.float32,
                     platforms: Sequence[str] | None = None) -> bytes:
    """Serialize ``model(x)`` in eval mode for inputs of ``batch_shape`` (None = symbolic)."""
    graphdef, state = nnx.split(model)

    def infer(x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    names = iter("bhwcdefg")
    dims = ",".join(next(names) if d is None else str(d) for d in batch_shape)
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), dtype)
    exported = jax.export.export(jax.jit(infer), platforms=platforms)(spec)
    return exported.serialize()


def load_inference(blob: bytes) -> Callable[[jax.Array], jax.Array]:
    """Deserialize :func:`export_inference` output into a callable ``x -> logits``."""
    return jax.export.deserialize(bytearray(blob)).call
