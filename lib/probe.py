"""Evaluation of frozen features: DINOv2's linear probe, the fine-grained logistic-regression grid, k-NN.

    from lib import probe
    feats = probe.extract(model, input_cfg, split="train")       # FeatureSet: per-block CLS, avg patch, labels
    val = probe.extract(model, input_cfg, split="validation")
    probe.linear_probe(feats, val)       # DINOv2 linear.py: grid over lr x {last 1, 4 blocks} x {+avgpool}
    probe.logistic_regression(feats, val)   # C = 1/wd over logspace(-6, 5, 45), z-scored final CLS; select on val
    probe.knn(feats, val)                # DINOv2 knn.py: cosine, k in (10, 20, 100, 200), T = 0.07 weighted vote

Features (``FeatureSet``) come from ``model.get_intermediate_layers(x, n=4, return_class_token=True)``
(normed, as DINOv2's evaluations): ``cls`` [N, 4, D] (the class tokens of the last four blocks, the
last one being ``x_norm_clstoken``), ``avgpool`` [N, D] (the mean of the last block's patch
tokens), ``labels`` [N]. DINOv2's linear input is ``cat(cls of the last n blocks)`` optionally
``+ avgpool``.

Differences from the official runs, for cost: the linear probe trains on features of the eval
transform extracted once (DINOv2 re-runs the backbone on random-resized crops every step); the
logistic regression uses scikit-learn's L-BFGS (the official one cuML's); both are documented choices
that keep a probe minutes on a CPU.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass
class FeatureSet:
    cls: np.ndarray        # [N, n_blocks, D] normed class tokens of the last blocks (last = final)
    avgpool: np.ndarray    # [N, D] mean of the final block's normed patch tokens
    labels: np.ndarray     # [N] int

    def linear_input(self, n_blocks: int = 1, avgpool: bool = False) -> np.ndarray:
        """DINOv2's ``create_linear_input``: the class tokens of the last ``n_blocks`` blocks
        concatenated, then the average patch token when ``avgpool``."""
        if not 1 <= n_blocks <= self.cls.shape[1]:
            raise ValueError(f"n_blocks={n_blocks}: the features hold the last {self.cls.shape[1]} blocks")
        parts = [self.cls[:, -n_blocks:].reshape(len(self.cls), -1)]
        if avgpool:
            parts.append(self.avgpool)
        return np.concatenate(parts, axis=1)

    @property
    def final_cls(self) -> np.ndarray:
        return self.cls[:, -1]


def features_of(model, images: jax.Array, n_blocks: int = 4):
    """``(cls [B, n, D], avgpool [B, D])`` of a DINOv2-style model (call under jit)."""
    layers = model.get_intermediate_layers(images, n=n_blocks, return_class_token=True)
    cls = jnp.stack([c for _, c in layers], axis=1)
    return cls.astype(jnp.float32), jnp.mean(layers[-1][0], axis=1).astype(jnp.float32)


def extract_arrays(model, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
                   n_blocks: int = 4) -> FeatureSet:
    """Features of an in-memory NHWC float32 image array (already normalised)."""
    model.eval()
    n_blocks = min(n_blocks, len(model.blocks))
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: features_of(nnx.merge(graphdef, s), x, n_blocks))
    cls, avg = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pad = batch_size - len(chunk) if len(images) > batch_size else 0   # one compiled shape
        c, a = fn(state, np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk)
        cls.append(np.asarray(c)[:len(chunk)])
        avg.append(np.asarray(a)[:len(chunk)])
    return FeatureSet(np.concatenate(cls), np.concatenate(avg), np.asarray(labels).astype(np.int64))


def extract(model, input_cfg, *, split: str, batch_size: int = 256, n_blocks: int = 4) -> FeatureSet:
    """Features of every example of ``split`` of a data config (``lib.data``: digits, TFDS or an image
    folder), through the eval transform (resize, center crop, normalise), in source order."""
    from lib import data
    cfg = input_cfg.copy_and_resolve_references()
    cfg.val_split = split
    cfg.shuffle = False
    pipeline = data.make_pipeline(cfg, train=False, batch_size=batch_size, seed=0, process_index=0, process_count=1)
    model.eval()
    n_blocks = min(n_blocks, len(model.blocks))
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: features_of(nnx.merge(graphdef, s), x, n_blocks))
    cls, avg, labels = [], [], []
    for batch in pipeline:
        keep = np.asarray(batch[data.VALID_KEY]) > 0          # drop the eval padding
        c, a = fn(state, batch["image"])
        cls.append(np.asarray(c)[keep])
        avg.append(np.asarray(a)[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return FeatureSet(np.concatenate(cls), np.concatenate(avg), np.concatenate(labels).astype(np.int64))


# ------------------------------------------------------------------------------------------------
# linear probe (DINOv2 eval/linear.py)
# ------------------------------------------------------------------------------------------------
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def _train_linear(x, y, num_classes, lrs, *, epochs, batch_size, seed):
    """One linear head per learning rate, trained together: SGD momentum 0.9, no weight decay, cosine
    to 0, init N(0, 0.01) / 0 (DINOv2's ``LinearClassifier``); lr scaled by batch/256 as DINOv2."""
    n, d = x.shape
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    key = jax.random.key(seed)
    lrs = jnp.asarray(lrs, jnp.float32) * batch_size / 256.0
    w = 0.01 * jax.random.normal(key, (len(lrs), d, num_classes))
    params = {"w": w, "b": jnp.zeros((len(lrs), num_classes))}
    mom = jax.tree.map(jnp.zeros_like, params)

    def loss_fn(p, xb, yb):
        logits = jnp.einsum("nd,hdc->hnc", xb, p["w"]) + p["b"][:, None]
        ls = optax.softmax_cross_entropy_with_integer_labels(logits, yb[None].repeat(len(lrs), 0))
        return jnp.sum(jnp.mean(ls, axis=1))      # heads are independent: the sum's gradient is per head

    @jax.jit
    def run(params, mom, x, y, key):
        def step(carry, i):
            p, m = carry
            perm_key = jax.random.fold_in(key, i // steps_per_epoch)
            order = jax.random.permutation(perm_key, n)
            idx = jax.lax.dynamic_slice(order, ((i % steps_per_epoch) * batch_size,), (batch_size,))
            g = jax.grad(loss_fn)(p, x[idx], y[idx])
            lr = lrs * 0.5 * (1 + jnp.cos(jnp.pi * i / total))
            m = jax.tree.map(lambda m_, g_: 0.9 * m_ + g_, m, g)
            p = jax.tree.map(lambda p_, m_: p_ - lr.reshape((-1,) + (1,) * (p_.ndim - 1)) * m_, p, m)
            return (p, m), None
        (params, _), _ = jax.lax.scan(step, (params, mom), jnp.arange(total))
        return params

    return run(params, mom, jnp.asarray(x, jnp.float32), jnp.asarray(y), jax.random.fold_in(key, 1))


def linear_probe(train: FeatureSet, val: FeatureSet, *, lrs: Sequence[float] = DINOV2_LRS,
                 n_blocks: Sequence[int] = (1, 4), avgpool: Sequence[bool] = (False, True), epochs: int = 10,
                 batch_size: int = 128, num_classes: int | None = None, seed: int = 0) -> dict:
    """DINOv2's linear evaluation grid on extracted features: every (lr, last n blocks, +avgpool)
    head trained on ``train``, top-1 on ``val``; returns the best and the whole table."""
    num_classes = num_classes or int(max(train.labels.max(), val.labels.max()) + 1)
    batch_size = min(batch_size, len(train.labels))
    table = []
    for nb in n_blocks:
        if nb > train.cls.shape[1]:
            continue
        for pool in avgpool:
            xt, xv = train.linear_input(nb, pool), val.linear_input(nb, pool)
            p = _train_linear(xt, train.labels, num_classes, list(lrs), epochs=epochs, batch_size=batch_size, seed=seed)
            logits = np.einsum("nd,hdc->hnc", xv, np.asarray(p["w"])) + np.asarray(p["b"])[:, None]
            acc = (logits.argmax(-1) == val.labels[None]).mean(1)
            table += [{"lr": float(lr), "n_blocks": nb, "avgpool": pool, "top1": float(a)} for lr, a in zip(lrs, acc)]
    best = max(table, key=lambda r: r["top1"])
    return {"top1": best["top1"], "best": best, "table": table}


# ------------------------------------------------------------------------------------------------
# logistic regression over a grid of C (the fine-grained protocol)
# ------------------------------------------------------------------------------------------------
FINE_GRAINED_WDS = tuple(float(w) for w in np.logspace(-6, 5, 45))


def logistic_regression(train: FeatureSet, val: FeatureSet, test: FeatureSet | None = None, *,
                        wds: Sequence[float] = FINE_GRAINED_WDS, max_iter: int = 500) -> dict:
    """Proteus' fine-grained protocol: the final normed CLS z-scored with the train statistics,
    multinomial L-BFGS logistic regression with ``C = 1 / wd`` over ``wds``; the best on ``val``
    is refit on train + val and scored on ``test`` (when given)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    warnings.filterwarnings("ignore", category=ConvergenceWarning)   # the weakest C of the grid stop at max_iter
    mean, std = train.final_cls.mean(0), train.final_cls.std(0) + 1e-6
    z = lambda f: (f.final_cls - mean) / std
    xt, xv = z(train), z(val)
    scores = []
    for wd in wds:
        clf = LogisticRegression(C=1.0 / wd, max_iter=max_iter)
        clf.fit(xt, train.labels)
        scores.append(float((clf.predict(xv) == val.labels).mean()))
    best = int(np.argmax(scores))
    result = {"val_top1": scores[best], "best_wd": float(wds[best]), "best_C": 1.0 / float(wds[best]),
              "grid": [{"wd": float(w), "val_top1": s} for w, s in zip(wds, scores)]}
    if test is not None:
        both = np.concatenate([train.final_cls, val.final_cls])
        mean, std = both.mean(0), both.std(0) + 1e-6
        clf = LogisticRegression(C=1.0 / wds[best], max_iter=max_iter)
        clf.fit((both - mean) / std, np.concatenate([train.labels, val.labels]))
        result["test_top1"] = float((clf.predict((test.final_cls - mean) / std) == test.labels).mean())
    return result


# ------------------------------------------------------------------------------------------------
# k-NN (DINOv2 eval/knn.py)
# ------------------------------------------------------------------------------------------------
def knn(train: FeatureSet, val: FeatureSet, *, ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
        num_classes: int | None = None, chunk: int = 1024) -> dict:
    """Weighted k-NN on L2-normalised final CLS features: each of the k most cosine-similar
    training examples votes for its class with ``exp(sim / T)``; top-1 for every k."""
    num_classes = num_classes or int(max(train.labels.max(), val.labels.max()) + 1)
    bank = train.final_cls / np.linalg.norm(train.final_cls, axis=1, keepdims=True)
    q = val.final_cls / np.linalg.norm(val.final_cls, axis=1, keepdims=True)
    ks = [k for k in ks if k <= len(bank)] or [len(bank)]
    kmax = max(ks)
    bank_j, labels_j = jnp.asarray(bank), jnp.asarray(train.labels)

    @jax.jit
    def votes(qc):
        sims, idx = jax.lax.top_k(qc @ bank_j.T, kmax)
        onehot = jax.nn.one_hot(labels_j[idx], num_classes) * jnp.exp(sims / temperature)[..., None]
        return jnp.stack([jnp.argmax(jnp.sum(onehot[:, :k], 1), -1) for k in ks], 0)

    preds = np.concatenate([np.asarray(votes(jnp.asarray(q[i:i + chunk]))) for i in range(0, len(q), chunk)], axis=1)
    accs = {f"top1_k{k}": float((p == val.labels).mean()) for k, p in zip(ks, preds)}
    return {"top1": max(accs.values()), **accs}
