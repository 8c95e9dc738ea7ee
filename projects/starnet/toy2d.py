"""The paper's 2-D toy (``2D_visual``): why the star operation helps, as a decision boundary.

``make_moons(n_samples=100, noise=0.4, random_state=0)``, the 2-D DemoNet in ``mul`` (star) or
``sum`` mode, SGD lr 0.1 momentum 0.9 wd 2e-4, cosine to 0.005 over 30 epochs (per epoch),
batch 32, label smoothing 0.1. The paper reports about 95% train accuracy for mul, 85% for sum.

Uses the same jitted train step as every other model (``lib.train.step``).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import zoo
from lib.train import optim, schedules, step as step_lib


def moons(n_samples: int = 100, noise: float = 0.4, random_state: int = 0):
    from sklearn.datasets import make_moons
    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=random_state)
    return x.astype(np.float32), y.astype(np.int32)


def train(mode: str = "mul", *, seed: int = 0, epochs: int = 30, batch_size: int = 32, lr: float = 0.1,
          min_lr: float = 0.005, momentum: float = 0.9, wd: float = 2e-4, label_smoothing: float = 0.1,
          data=None):
    """Train one toy network; returns (model, train accuracy, per-epoch loss list)."""
    x, y = data if data is not None else moons()
    n = len(x)
    steps_per_epoch = -(-n // batch_size)  # torch DataLoader keeps the last partial batch
    model = zoo.create_model(f"demonet_2d_{mode}", num_classes=2, rngs=seed)

    def schedule(step):  # CosineAnnealingLR(T_max=epochs, eta_min=min_lr), stepped per epoch
        return schedules.cosine_lr(jnp.floor(step / steps_per_epoch), lr=lr, min_lr=min_lr, epochs=epochs)

    tx = optim.make_optimizer(schedule, name="sgd", weight_decay=wd, momentum=momentum)
    graphdef, state = step_lib.init_train_state(model, tx, ema=False)
    cfg = step_lib.StepConfig(num_classes=2, label_smoothing=label_smoothing)
    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, cfg, base_key=jax.random.key(seed),
                                                  state_shardings=None, batch_shardings=None, donate=False))
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(n)
        epoch_loss = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            state, metrics = train_step(state, {"image": x[idx], "label": y[idx]})
            epoch_loss.append(float(metrics["loss"]))
        losses.append(float(np.mean(epoch_loss)))
    model = nnx.merge(graphdef, state["params"], state["rest"])
    accuracy = float(np.mean(np.argmax(np.asarray(model(x)), -1) == y))
    return model, accuracy, losses


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
    """Entry point for ``configs/starnet/toy2d.py``: trains each seed, saves the plot and a summary."""
    workdir = Path(workdir).absolute()
    if not workdir.parent.is_dir():
        raise ValueError(f"the parent of workdir does not exist: {workdir.parent}")
    workdir.mkdir(exist_ok=True)
    data = moons(config.n_samples, config.noise, config.data_seed)
    modes = [config.mode] if config.mode != "both" else ["mul", "sum"]
    summary, shown = {}, {}
    for mode in modes:
        accs = []
        for seed in range(config.seeds):
            model, acc, _ = train(mode, seed=seed, epochs=config.epochs, batch_size=config.batch_size,
                                  lr=config.lr, min_lr=config.min_lr, momentum=config.momentum, wd=config.wd,
                                  label_smoothing=config.label_smoothing, data=data)
            accs.append(acc)
            if seed == 0:
                shown[mode] = (model, acc)
        summary[mode] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "per_seed": accs}
        print(f"{mode}: train accuracy {np.mean(accs):.3f} +- {np.std(accs):.3f} over {len(accs)} seeds")
    png = plot_boundaries(shown, workdir / "decision_boundary.png", data)
    (workdir / "toy2d.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {png}")
    first = summary[modes[0]]["mean"]
    print(f"final: top1={first:.4f} step={config.epochs} " + " ".join(f"{m}={s['mean']:.4f}" for m, s in summary.items()))
    return summary
