"""Context Clusters' token mixer ("Image as Set of Points", ICLR 2023) and its helpers.

An image is a set of points (pixels with their features); a ``Cluster`` layer groups the points
of each region around a few *centers* and lets each point exchange information with its center.
Reproduces ``Cluster`` of ma-xu/Context-Cluster ``models/context_cluster.py`` exactly:

1. ``feat = f(x)``, ``value = v(x)`` (1x1 convs, stored as linears), split into heads *head-major*
   (channel ``e * head_dim + c``) and the heads moved into the batch;
2. only when both fold factors exceed 1, each map is cut into ``fold[0] x fold[1]`` regions that
   also move into the batch (order: sample, head, region row, region col);
3. centers = adaptive average pooling of ``feat`` / ``value`` to ``proposal`` bins per region, with
   PyTorch's bins (they overlap when the sizes do not divide, e.g. 7 -> 2 is rows 0-3 and 3-6);
4. ``sim = sigmoid(beta + alpha * cos(center, point))``; each point keeps only its most similar
   center (first max on ties). Computed in float32 whatever the compute dtype, because a
   bfloat16 near-tie flips the assignment;
5. aggregate ``out_c = (value_center + sum_n sim * value_n) / (1 + sum_n sim)`` and dispatch
   ``out_n = sim_n * out_c[assigned center]``; undo the fold and the head split; ``proj``.

The aggregation is one ``[B', M, N] x [B', N, D]`` matmul and the dispatch a gather: no
``[B', M, N, D]`` tensor is ever formed (upstream broadcasts one).
On XLA:CPU (``lib.layers.conv.set_conv_impl``: "auto" on CPU, or "fast") float32 mixers run an
equivalent form without the fold transposes, batched tiny matmuls or the full-width v(x) and
dispatched maps (``Cluster._call_fast``; equal to float32 round-off, ``tests/test_coc.py``).

``normalize="point_count"`` replaces ``sum_n sim`` by the number of assigned points: the code
before upstream commit 3ccb0b6 (2023-05-31) did that (``mask.sum``), and the checkpoints released
before then were trained with it.

Naming: upstream calls the height axis "w" (``fold_w``, ``proposal_w`` act on rows). Here
``fold`` and ``proposal`` are ``(rows, cols)`` pairs (or one int for both).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import sharding
from lib.layers.conv import use_fast_path
from lib.layers.linear import Linear

NORMALIZE_MODES = ("sim_sum", "point_count")
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls stay float32 on TPU/GPU (no bf16 passes)


def _at_least_f32(dtype):
    """float32 for bfloat16/float16/float32 inputs, float64 for float64 ones (x64 parity checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def coordinate_channels(height: int, width: int) -> jax.Array:
    """The two position channels CoC appends to the image: ``[H, W, 2]`` float32 (row, col).

    ``row = i / (H - 1) - 0.5`` varies along H, ``col = j / (W - 1) - 0.5`` along W; both lie in
    [-0.5, 0.5] and are recomputed for every input size (upstream builds them in float32 too).
    """
    if height < 2 or width < 2:
        raise ValueError(f"coordinate channels need an image of at least 2x2 pixels, got {height}x{width}")
    rows = jnp.arange(height, dtype=jnp.float32) / jnp.float32(height - 1.0)
    cols = jnp.arange(width, dtype=jnp.float32) / jnp.float32(width - 1.0)
    return jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1) - 0.5


def adaptive_bins(size: int, bins: int) -> list[tuple[int, int]]:
    """``torch.nn.AdaptiveAvgPool`` bins: bin i spans ``[floor(i*size/bins), ceil((i+1)*size/bins))``.

    Neighbouring bins overlap when ``bins`` does not divide ``size`` (7 -> 2: [0, 4), [3, 7)).
    """
    return [((i * size) // bins, -(-((i + 1) * size) // bins)) for i in range(bins)]


def adaptive_avg_pool(x: jax.Array, output_size) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d(output_size)`` on NHWC ``[B, H, W, C] -> [B, P, Q, C]``.

    Each output is the sum over its (possibly overlapping) bin divided by the bin's size, as in
    PyTorch; computed in (at least) float32 and returned in ``x``'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool expects NHWC [batch, height, width, channels], got {x.shape}")
    return _bin_means(x.astype(_at_least_f32(x.dtype)), (1, 2), _pair(output_size)).astype(x.dtype)


def _bin_means(x: jax.Array, axes: tuple[int, int], bins: tuple[int, int]) -> jax.Array:
    """Means of ``x`` over the adaptive bins of two axes (rows, then columns): PyTorch's adaptive
    average pooling of those axes, as static-slice sums divided by each bin's area."""
    (row_axis, col_axis), (p, q) = axes, bins
    sums = _pool_sums(_pool_sums(x, row_axis, p), col_axis, q)
    shape = [1] * x.ndim
    shape[row_axis], shape[col_axis] = p, q
    areas = _bin_counts(x.shape[row_axis], p)[:, None] * _bin_counts(x.shape[col_axis], q)[None, :]
    return sums / areas.reshape(shape).astype(sums.dtype)


def _pool_sums(x: jax.Array, axis: int, bins: int) -> jax.Array:
    """Sums of ``x`` over the adaptive bins of one axis (static slices), stacked in that axis."""
    parts = [jnp.sum(jax.lax.slice_in_dim(x, start, end, axis=axis), axis=axis, keepdims=True)
             for start, end in adaptive_bins(x.shape[axis], bins)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _bin_counts(size: int, bins: int) -> np.ndarray:
    return np.array([end - start for start, end in adaptive_bins(size, bins)], np.float64)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """``torch.nn.functional.normalize``: ``x / max(||x||, 1e-12)`` over the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Cluster(nnx.Module):
    """The context-cluster token mixer on NHWC maps (see the module docstring).

    Args:
      dim: input channels; ``out_dim`` output channels (default ``dim``).
      heads, head_dim: E and D; ``f`` and ``v`` map ``dim -> E * D`` (often more than ``dim``).
      proposal: centers per region, ``(rows, cols)`` or one int (M = rows * cols).
      fold: regions per map, ``(rows, cols)``; only used when both exceed 1, and then they must
        divide the map size.
      normalize: ``"sim_sum"`` (current upstream) or ``"point_count"`` (checkpoints before
        May 2023).
      dtype: compute dtype of the linears, aggregation and dispatch; the similarity, the
        assignment and the normalisation always run in float32.
    """

    def __init__(self, dim: int, out_dim: int | None = None, *, heads: int = 4, head_dim: int = 24,
                 proposal=2, fold=1, normalize: str = "sim_sum", dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalize={normalize!r}; expected one of {NORMALIZE_MODES}")
        self.heads, self.head_dim = heads, head_dim
        self.proposal, self.fold, self.normalize, self.dtype = _pair(proposal), _pair(fold), normalize, dtype
        # 1x1 convs upstream: PyTorch's default conv init ("torch"), stored as linears.
        kw = dict(init="torch", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.f = Linear(dim, heads * head_dim, **kw)        # features for the similarity
        self.v = Linear(dim, heads * head_dim, **kw)        # values
        self.proj = Linear(heads * head_dim, out_dim or dim, **kw)
        self.sim_alpha = sharding.param(jnp.ones((1,), param_dtype), (None,))
        self.sim_beta = sharding.param(jnp.zeros((1,), param_dtype), (None,))

    # --- layout: [B, H, W, E*D] <-> [B*E*regions, h, w, D] ----------------------------------------
    def _folds(self, height: int, width: int) -> tuple[int, int]:
        fr, fc = self.fold
        if fr > 1 and fc > 1:  # upstream folds only when both factors exceed 1
            if height % fr or width % fc:
                raise ValueError(f"Cluster: a {height}x{width} feature map cannot be cut into {fr}x{fc} "
                                 f"regions (fold must divide the map size)")
            return fr, fc
        return 1, 1

    def _split(self, y: jax.Array) -> jax.Array:
        b, h, w, _ = y.shape
        e, d = self.heads, y.shape[-1] // self.heads
        fr, fc = self._folds(h, w)
        y = y.reshape(b, fr, h // fr, fc, w // fc, e, d)            # channel = e * d_head + c
        y = y.transpose(0, 5, 1, 3, 2, 4, 6)                        # [b, e, fr, fc, h', w', d]
        return y.reshape(b * e * fr * fc, h // fr, w // fc, d)

    def _merge(self, y: jax.Array, height: int, width: int) -> jax.Array:
        fr, fc = self._folds(height, width)
        e, (hr, wr, d) = self.heads, y.shape[1:]
        b = y.shape[0] // (e * fr * fc)
        y = y.reshape(b, e, fr, fc, hr, wr, d).transpose(0, 2, 4, 3, 5, 1, 6)
        return y.reshape(b, height, width, e * d)

    # --- the clustering -----------------------------------------------------------------------------
    def similarity(self, feat: jax.Array, alpha: jax.Array | None = None, beta: jax.Array | None = None) -> jax.Array:
        """``sigmoid(beta + alpha * cos(centers, points))`` of split maps ``[B', h, w, D]``:
        ``[B', M, N]`` float32 (float64 for float64 input), centers and points in row-major order.
        ``alpha`` / ``beta`` default to the module's."""
        feat = feat.astype(_at_least_f32(feat.dtype))
        n_regions, d = feat.shape[0], feat.shape[-1]
        centers = adaptive_avg_pool(feat, self.proposal).reshape(n_regions, -1, d)
        points = feat.reshape(n_regions, -1, d)
        cos = jnp.einsum("bmd,bnd->bmn", _l2_normalize(centers), _l2_normalize(points), precision=_HIGHEST)
        alpha = (self.sim_alpha[...] if alpha is None else alpha).astype(feat.dtype)
        beta = (self.sim_beta[...] if beta is None else beta).astype(feat.dtype)
        return jax.nn.sigmoid(beta + alpha * cos)

    @staticmethod
    def assign(sim: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Hard assignment: each point's most similar center (first max) and that similarity,
        ``[B', N]`` each. Gradients reach only the kept similarities."""
        idx = jnp.argmax(sim, axis=1)
        kept = jnp.take_along_axis(sim, idx[:, None, :], axis=1)[:, 0]
        return idx, kept

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"Cluster expects NHWC [batch, height, width, channels], got shape {tuple(x.shape)}")
        if self._fast_path_applies(x):
            return self._fast_forward_reference_gradient(x)
        return self._reference(x)

    def _reference(self, x: jax.Array, arrays: dict | None = None) -> jax.Array:
        """The mixer as documented; ``arrays`` (see ``_arrays``) replaces the module's parameters
        (float32/64 linears only: the plain ``x @ W + b`` that ``Linear`` computes for them)."""
        height, width = x.shape[1:3]
        if arrays is None:
            value, feat, alpha, beta = self.v(x), self.f(x), None, None
        else:
            value, feat = x @ arrays["wv"] + arrays["bv"], x @ arrays["wf"] + arrays["bf"]
            alpha, beta = arrays["alpha"], arrays["beta"]
        value, feat = self._split(value), self._split(feat)
        n_regions, d = value.shape[0], value.shape[-1]
        idx, kept = self.assign(self.similarity(feat, alpha, beta))  # [B', N] each, float32 sims
        m = self.proposal[0] * self.proposal[1]
        onehot = jax.nn.one_hot(idx, m, axis=1, dtype=kept.dtype)    # [B', M, N]
        sim = onehot * kept[:, None, :]                              # the kept similarities only

        # Aggregate: (value_center + sum_n sim * value_n) / (1 + sum_n sim), float32 accumulation.
        value_flat = value.reshape(n_regions, -1, d)
        agg = jnp.einsum("bmn,bnd->bmd", sim.astype(value.dtype), value_flat,
                         preferred_element_type=kept.dtype, precision=_HIGHEST)
        value_centers = adaptive_avg_pool(value, self.proposal).reshape(n_regions, m, d)
        weight = sim if self.normalize == "sim_sum" else onehot
        centers_out = (agg + value_centers.astype(kept.dtype)) / (jnp.sum(weight, -1)[..., None] + 1.0)

        # Dispatch: out_n = sim_n * out_c[assigned center] (a gather; the other centers add zeros).
        out = jnp.take_along_axis(centers_out, idx[..., None], axis=1) * kept[..., None]
        out = self._merge(out.astype(value.dtype).reshape(value.shape), height, width)
        return self.proj(out) if arrays is None else out @ arrays["wp"] + arrays["bp"]

    def _fast_path_applies(self, x: jax.Array) -> bool:
        """The XLA:CPU form below: on the fast path, for float32 (or float64) linears."""
        if not use_fast_path():
            return False
        dtypes = [self.dtype or jnp.result_type(x.dtype, layer.kernel.dtype) for layer in (self.f, self.v, self.proj)]
        return all(jnp.dtype(dt) == _at_least_f32(dt) for dt in dtypes) and self.v.bias is not None \
            and self.f.bias is not None and self.proj.bias is not None

    def _arrays(self, dtype) -> dict:
        """The parameters as plain arrays in ``dtype`` (the fast path's float32/64)."""
        arrays = dict(wf=self.f.kernel, bf=self.f.bias, wv=self.v.kernel, bv=self.v.bias, wp=self.proj.kernel,
                      bp=self.proj.bias, alpha=self.sim_alpha, beta=self.sim_beta)
        return {name: var[...].astype(dtype) for name, var in arrays.items()}

    def _fast_forward_reference_gradient(self, x: jax.Array) -> jax.Array:
        """``_call_fast`` for evaluation; under differentiation the reference form, forward and
        backward: XLA:CPU fuses the backward of the fast form poorly (it stores broadcasts such as
        ``[B, fr, h', fc, w', E, M, C]``) and it measured slower than the reference backward."""
        dtype = self.dtype or jnp.result_type(x.dtype, self.f.kernel.dtype)
        arrays, x = self._arrays(dtype), x.astype(dtype)

        @jax.custom_vjp
        def mixer(arrays, x):
            return self._call_fast(x, arrays)

        def forward(arrays, x):
            return jax.vjp(lambda a, y: self._reference(y, a), arrays, x)

        mixer.defvjp(forward, lambda vjp, g: vjp(g))
        return mixer(arrays, x)

    def _call_fast(self, x: jax.Array, arrays: dict) -> jax.Array:
        """``__call__`` for XLA:CPU (float32/64 linears), the same results to float32 round-off.

        On XLA:CPU the reference form is bound by the ``[B, H, W, E*D]`` maps it writes (f(x),
        v(x), the fold transposes, the gathered output: each a full pass over memory) and by the
        batched tiny matmuls. Here the maps stay in place as ``[B, fr, h', fc, w', E, D]`` (a
        reshape, no transpose), and the affine ``v`` and ``proj`` are moved past the sums over
        points, so that only f(x) is ever written at full width:

        * centers: ``pool(f(x)) = f(pool(x))`` and ``pool(v(x)) = v(pool(x))``, pooled by static
          slices and sums;
        * aggregation: ``sum_n sim_n v(x_n) = (sum_n sim_n x_n) W_v + (sum_n sim_n) b_v``;
        * dispatch and ``proj``: ``proj(sum_m sim_m out_m) = sum_(e, m) sim_(e, m) (out_(e, m) P_e) + b_p``
          (the sum over M has one non-zero term per head: the assigned center).

        Each contraction over points is a broadcast multiply and reduction that XLA fuses; the
        per-region ``[M, D] x [D, C]`` products are small matmuls. Differentiated, the reference
        form runs instead (``_fast_forward_reference_gradient``).
        """
        b, height, width, cin = x.shape
        e, (p, q) = self.heads, self.proposal
        fr, fc = self._folds(height, width)
        hr, wr, m = height // fr, width // fc, p * q
        acc, params = x.dtype, arrays                                # float32 (or 64) throughout
        d = params["wf"].shape[1] // e
        xr = x.astype(acc).reshape(b, fr, hr, fc, wr, cin)

        # Centers [b, fr, fc, E, M, D] from the pooled input (bins as in adaptive_avg_pool).
        pooled = _bin_means(xr, (2, 4), (p, q))                                      # [b, fr, p, fc, q, C]

        def center_layout(y):                                        # [b, fr, p, fc, q, E*D] ->
            y = y.reshape(b, fr, p, fc, q, e, d).transpose(0, 1, 3, 5, 2, 4, 6)
            return y.reshape(b, fr, fc, e, m, d)

        feat_centers = center_layout(pooled @ params["wf"] + params["bf"])
        value_centers = center_layout(pooled @ params["wv"] + params["bv"])

        # Similarity [b, fr, h', fc, w', E, M]; the kept (first-max) similarity, zeros elsewhere.
        feat = (jnp.matmul(x.astype(acc), params["wf"]) + params["bf"]).reshape(b, fr, hr, fc, wr, e, d)
        cu = _l2_normalize(feat_centers)[:, :, None, :, None]               # [b, fr, 1, fc, 1, E, M, D]
        cos = jnp.sum(cu * _l2_normalize(feat)[..., None, :], axis=-1)
        sim = jax.nn.sigmoid(params["beta"] + params["alpha"] * cos)
        onehot = jnp.argmax(sim, axis=-1)[..., None] == jnp.arange(m)
        sim = jnp.where(onehot, sim, 0.0)

        # Aggregate: (value_center + sum_n sim v(x_n)) / (1 + sum_n weight), per region and head.
        sx = jnp.sum(sim[..., None] * xr[..., None, None, :], axis=(2, 4))   # [b, fr, fc, E, M, C]
        sim_sum = jnp.sum(sim, axis=(2, 4))                                  # [b, fr, fc, E, M]
        weight_sum = sim_sum if self.normalize == "sim_sum" else jnp.sum(onehot, axis=(2, 4)).astype(acc)
        agg = jnp.einsum("bijemc,ced->bijemd", sx, params["wv"].reshape(cin, e, d), precision=_HIGHEST)
        agg = agg + sim_sum[..., None] * params["bv"].reshape(e, 1, d)
        centers_out = (agg + value_centers) / (weight_sum[..., None] + 1.0)  # [b, fr, fc, E, M, D]

        # Dispatch + proj: out_n = sum_(e, m) sim_n(e, m) (centers_out(e, m) P_e) + b_p.
        projected = jnp.einsum("bijemd,edo->bijemo", centers_out, params["wp"].reshape(e, d, -1),
                               precision=_HIGHEST).reshape(b, fr, 1, fc, 1, e * m, -1)
        out = jnp.sum(sim.reshape(b, fr, hr, fc, wr, e * m, 1) * projected, axis=-2) + params["bp"]
        return out.reshape(b, height, width, -1)

    def assignments(self, x: jax.Array) -> dict[str, jax.Array]:
        """What the clustering does to ``x`` (this mixer's input, NHWC), for visualisation.

        Returns a dict of
          ``assignment`` ``[B, E, H, W]`` int32: each point's center, numbered over the whole map
            (``region * M + m``, regions row-major, centers row-major within a region);
          ``similarity`` ``[B, E, H, W]`` float32: the similarity to that center (the kept value);
          ``similarities`` ``[B, E, H, W, M]`` float32: the similarity to every center of the
            point's own region;
          ``centers`` ``[R * M, 2]`` float32: each center's (row, col) in feature-map pixels, the
            middle of its pooling bin.
        """
        height, width = x.shape[1:3]
        sim = self.similarity(self._split(self.f(x)))                # [B', M, N]
        idx, kept = self.assign(sim)
        fr, fc = self._folds(height, width)
        hr, wr = height // fr, width // fc
        m = sim.shape[1]
        region = jnp.arange(sim.shape[0]) % (fr * fc)                # batch order: (sample, head, region)
        global_idx = idx + (region * m)[:, None]

        def to_map(y):                                               # [B', N, C] -> [B, E, H, W, C]
            c = y.shape[-1]
            y = self._merge(y.reshape(-1, hr, wr, c), height, width)
            return y.reshape(y.shape[0], height, width, self.heads, c).transpose(0, 3, 1, 2, 4)

        rows = [(a + b - 1) / 2 for a, b in adaptive_bins(hr, self.proposal[0])]
        cols = [(a + b - 1) / 2 for a, b in adaptive_bins(wr, self.proposal[1])]
        centers = [(i * hr + r, j * wr + c) for i in range(fr) for j in range(fc) for r in rows for c in cols]
        return dict(assignment=to_map(global_idx[..., None])[..., 0].astype(jnp.int32),
                    similarity=to_map(kept[..., None])[..., 0],
                    similarities=to_map(jnp.swapaxes(sim, 1, 2)),
                    centers=jnp.asarray(centers, jnp.float32))
