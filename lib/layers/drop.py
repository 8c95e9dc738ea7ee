"""DropPath (stochastic depth), per sample, as in timm."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class DropPath(nnx.Module):
    """Zero a residual branch for a random subset of samples, scale the rest by 1/keep.

    Each sample draws Bernoulli(1 - rate) once for all its features. Off in ``model.eval()``
    (``deterministic=True``) and always off when ``rate == 0``. Randomness comes from the
    module's own ``dropout`` stream; the train step reseeds streams from ``fold_in(key, step)``.
    """

    def __init__(self, rate: float = 0.0, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate, self.deterministic = float(rate), deterministic
        self.rngs = rngs["dropout"].fork() if (rate > 0 and rngs is not None) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate == 0.0 or self.deterministic:
            return x
        if self.rngs is None:
            raise ValueError("DropPath with rate > 0 needs rngs with a 'dropout' stream at construction")
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros((), x.dtype)).astype(x.dtype)


def drop_path_rates(rate: float, depths) -> list[float]:
    """``linspace(0, rate, sum(depths))``: the per-block schedule of every upstream model."""
    total = sum(depths)
    if total <= 1:  # torch.linspace(0, r, 1) == [0]
        return [0.0] * total
    return [float(rate) * i / (total - 1) for i in range(total)]
