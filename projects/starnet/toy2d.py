"""The paper's 2-D toy (``2D_visual``): why the star operation helps, as a decision boundary.

Trains as the official ``2D_visual/main.py`` does: ``make_moons(n_samples=100, noise=0.4,
random_state=0)``; the 2-D DemoNet in ``mul`` (star) or ``sum`` mode with every Linear at
trunc_normal(std 0.02) and zero bias; batches of 32 reshuffled every epoch, the last partial batch
dropped (``drop_last=True``: 3 steps per epoch); ``torch.optim.SGD(model.parameters(), lr 0.1,
momentum 0.9, weight_decay 2e-4)``, i.e. weight decay on every parameter, biases and LayerNorms
included; the gradient clipped to global norm 1.0 every step; cosine from 0.1 to 0.005 over 30
epochs, stepped per epoch; label smoothing 0.1. After every epoch the official code measures the
accuracy on all 100 training points in eval mode and reports the best epoch's; :func:`train`
records that per-epoch history too. The paper reports about 95% train accuracy for mul, 85% for sum.

Uses the same jitted train step and classification task as every other model (``lib.train.step``,
``lib.tasks.classification``), with an in-memory epoch loop over the 100 points as the official script.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import zoo
from lib.tasks.classification import Classification
from lib.train import optim, schedules, step as step_lib


def moons(n_samples: int = 100, noise: float = 0.4, random_state: int = 0):
    from sklearn.datasets import make_moons
    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=random_state)
    return x.astype(np.float32), y.astype(np.int32)


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int, drop_last: bool = True) -> list[np.ndarray]:
    """One epoch of ``DataLoader(shuffle=True, drop_last=...)``: a fresh permutation of ``range(n)``
    cut into batches; with ``drop_last`` the last partial batch (n % batch_size points) is skipped."""
    order = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def train(mode: str = "mul", *, seed: int = 0, epochs: int = 30, batch_size: int = 32, lr: float = 0.1,
          min_lr: float = 0.005, momentum: float = 0.9, wd: float = 2e-4, label_smoothing: float = 0.1,
          grad_clip: float | None = 1.0, drop_last: bool = True, decay_1d_params: bool = True,
          init: str = "trunc_normal", data=None, history: dict | None = None):
    """Train one toy network; returns (model, final train accuracy, per-epoch loss list).

    The defaults are the official ones. ``grad_clip=None`` (or 0) disables clipping, ``drop_last=False``
    keeps the last partial batch, ``decay_1d_params=False`` exempts biases and norms from weight
    decay, ``init="torch"`` uses PyTorch's default Linear init. If ``history`` (a dict) is given it
    receives ``"loss"`` and ``"accuracy"``, the per-epoch mean loss and the accuracy on all points
    after each epoch (the official code reports the maximum of the latter, as ``best_acc``), and
    ``"steps"``, the number of optimizer steps taken.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    x, y = data if data is not None else moons()
    n = len(x)
    steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)  # as epoch_batches cuts
    if steps_per_epoch < 1:
        raise ValueError(f"drop_last with {n} points and batch_size {batch_size} leaves no batch")
    model = zoo.create_model(f"demonet_2d_{mode}", num_classes=2, init=init, rngs=seed)

    def schedule(step):  # CosineAnnealingLR(T_max=epochs, eta_min=min_lr), stepped per epoch
        return schedules.cosine_lr(jnp.floor(step / steps_per_epoch), lr=lr, min_lr=min_lr, epochs=epochs)

    tx = optim.make_optimizer(schedule, name="sgd", weight_decay=wd, momentum=momentum, grad_clip=grad_clip,
                              decay_1d_params=decay_1d_params)
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False)
    task = Classification(num_classes=2, label_smoothing=label_smoothing)   # points in place of images
    train_step = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, base_key=jax.random.key(seed),
                                          donate=False)
    predict = jax.jit(lambda params, rest, points: jnp.argmax(nnx.merge(graphdef, params, frozen, rest)(points), -1))
    rng = np.random.default_rng(seed)
    losses, accuracies, steps = [], [], 0
    for _ in range(epochs):
        epoch_loss = []
        for idx in epoch_batches(rng, n, batch_size, drop_last):
            state, metrics = train_step(state, {"image": x[idx], "label": y[idx]})
            epoch_loss.append(float(metrics["loss"]))
            steps += 1
        losses.append(float(np.mean(epoch_loss)))
        accuracies.append(float(np.mean(np.asarray(predict(state["params"], state["rest"], x)) == y)))
    if history is not None:
        history.update(loss=losses, accuracy=accuracies, steps=steps)
    model = nnx.merge(graphdef, state["params"], frozen, state["rest"])
    return model, accuracies[-1], losses


def decision_grid(model, step: float = 0.02):
    """Class-1 probability on the paper's grid x in [-2, 3), y in [-2, 2.5)."""
    xs, ys = np.arange(-2, 3, step), np.arange(-2, 2.5, step)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], -1).astype(np.float32)
    prob = jax.nn.softmax(jax.jit(lambda p: model(p))(pts), -1)[:, 1]
    return gx, gy, np.asarray(prob).reshape(gx.shape)


def plot_boundaries(results: dict, path: str | Path, data=None) -> Path:
    """Side-by-side decision boundaries, one panel per (mode -> (model, accuracy))."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's (e.g. notebook) backend alone
    x, y = data if data is not None else moons()
    fig = Figure(figsize=(5 * len(results), 4.2))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (mode, (model, acc)) in zip(axes[0], results.items()):
        gx, gy, prob = decision_grid(model)
        ax.contourf(gx, gy, prob, levels=20, cmap="RdBu_r", alpha=0.6)
        ax.contour(gx, gy, prob, levels=[0.5], colors="k", linewidths=1.5)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu_r", edgecolors="k", s=25)
        ax.set_title(f"{mode}: train accuracy {acc:.0%}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def run(config, workdir) -> dict:
    """Entry point for ``configs/starnet/toy2d.py``: trains each seed, saves the plot and a summary.

    Per mode, ``toy2d.json`` holds the final train accuracy (``mean``, ``std``, ``per_seed``) and the
    best epoch's, as the official script reports it (``best_mean``, ``best_std``, ``best_per_seed``).
    """
    workdir = Path(workdir).absolute()
    if not workdir.parent.is_dir():
        raise ValueError(f"the parent of workdir does not exist: {workdir.parent}")
    workdir.mkdir(exist_ok=True)
    data = moons(config.n_samples, config.noise, config.data_seed)
    modes = [config.mode] if config.mode != "both" else ["mul", "sum"]
    options = dict(grad_clip=config.get("grad_clip", 1.0), drop_last=config.get("drop_last", True),
                   decay_1d_params=config.get("decay_1d_params", True), init=config.get("init", "trunc_normal"))
    summary, shown = {}, {}
    for mode in modes:
        accs, bests = [], []
        for seed in range(config.seeds):
            history = {}
            model, acc, _ = train(mode, seed=seed, epochs=config.epochs, batch_size=config.batch_size,
                                  lr=config.lr, min_lr=config.min_lr, momentum=config.momentum, wd=config.wd,
                                  label_smoothing=config.label_smoothing, data=data, history=history, **options)
            accs.append(acc)
            bests.append(max(history["accuracy"]))
            if seed == 0:
                shown[mode] = (model, acc)
        summary[mode] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "per_seed": accs,
                         "best_mean": float(np.mean(bests)), "best_std": float(np.std(bests)),
                         "best_per_seed": bests}
        print(f"{mode}: train accuracy {np.mean(accs):.3f} +- {np.std(accs):.3f} over {len(accs)} seeds "
              f"(best epoch {np.mean(bests):.3f} +- {np.std(bests):.3f})")
    png = plot_boundaries(shown, workdir / "decision_boundary.png", data)
    (workdir / "toy2d.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {png}")
    first = summary[modes[0]]["mean"]
    print(f"final: top1={first:.4f} step={config.epochs} " + " ".join(f"{m}={s['mean']:.4f}" for m, s in summary.items()))
    return summary
