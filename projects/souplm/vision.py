"""The model-soups claim on digits: several StarNet fine-tunes from one start, souped.

    python -m projects.souplm.vision --workdir runs/souplm_vision --reps 3 --k 4

One base run (``base_epochs`` on digits) then, per repetition, ``k`` fine-tunes from it that differ
in their seed (data order, crops). The digits validation split (300) is cut in two: the first 100
images are the held-out set (greedy order and acceptance, the learned soup's alphas), the last 200
the test set every number below is measured on. Compared: each fine-tune, the best single model
(by held-out accuracy), the uniform soup, the greedy soup, the learned soup (alpha per model and
per layer, trained on the held-out half through the generic step) and the output ensemble (mean of
the K softmaxes). Writes ``results.json`` and ``table.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.starnet import digits
from lib import data, soup, zoo
from lib.tasks.classification import Classification
from lib.train import loop
from projects.souplm.common import fit_alphas, mean_std, write_json

MODEL = "starnet_s050"


def train_and_save(config, workdir: Path) -> Path:
    """Train with the generic loop and save the final weights to ``workdir/weights``."""
    weights = workdir / "weights"
    if weights.exists():
        return weights
    workdir.parent.mkdir(parents=True, exist_ok=True)
    r = loop.setup(config, workdir)
    log = loop._MetricsLog(r)
    try:
        loop.train(r, log)
    finally:
        r.checkpointer.close()
        log.close()
    zoo.save_weights(r.model(), weights)
    return weights


def val_arrays(config):
    src = data.make_source(config.input, data.pipeline.split_of(config.input, train=False))
    batch = next(iter(data.make_pipeline(config.input, train=False, batch_size=300, seed=0, source=src)))
    return batch["image"], batch["label"]


@jax.jit
def _logits(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    model.eval()
    return model(x)


def logits_of(model, x):
    return np.asarray(_logits(*nnx.split(model), x))


def acc(logits, y) -> float:
    return float(100.0 * np.mean(np.argmax(logits, -1) == y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--base_epochs", type=int, default=1)
    ap.add_argument("--ft_epochs", type=int, default=2)
    ap.add_argument("--ft_lr", type=float, default=2e-3)
    ap.add_argument("--soup_steps", type=int, default=100)
    args = ap.parse_args(argv)
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)

    base_cfg = digits.get_config(f"epochs={args.base_epochs}")
    base_cfg.log_every, base_cfg.checkpoint_every, base_cfg.warmup_epochs = 100, 0, 0
    base = train_and_save(base_cfg, work / "base")
    x, y = val_arrays(base_cfg)
    held, test = slice(0, 100), slice(100, 300)
    task = soup.SoupTask(Classification(10), num_experts=args.k)

    rows = []
    for rep in range(args.reps):
        paths = []
        for i in range(args.k):
            c = digits.get_config(f"epochs={args.ft_epochs}")
            c.seed, c.init_from, c.lr, c.warmup_epochs = 1000 * (rep + 1) + i, str(base), args.ft_lr, 0
            c.log_every, c.checkpoint_every = 100, 0
            paths.append(train_and_save(c, work / f"rep{rep}" / f"ft{i}"))
        models = [zoo.create_model(MODEL, num_classes=10, weights=p) for p in paths]
        outs = [logits_of(m, x) for m in models]
        held_acc = [acc(o[held], y[held]) for o in outs]
        test_acc = [acc(o[test], y[test]) for o in outs]
        best = int(np.argmax(held_acc))
        row = {"rep": rep, "individual_test": test_acc, "individual_held": held_acc,
               "best_single": test_acc[best], "mean_single": float(np.mean(test_acc))}
        row["uniform_soup"] = acc(logits_of(soup.uniform_soup(models), x)[test], y[test])
        greedy = soup.greedy_soup(models, lambda m: acc(logits_of(m, x)[held], y[held]), individual=held_acc)
        row["greedy_soup"] = acc(logits_of(greedy.model, x)[test], y[test])
        row["greedy_chosen"] = greedy.chosen
        probs = np.mean([jax.nn.softmax(o) for o in outs], axis=0)
        row["ensemble"] = acc(probs[test], y[test])
        batch = {"image": jnp.asarray(x[held]), "label": jnp.asarray(y[held])}
        for g in ("model", "layer"):
            learn, losses = fit_alphas(soup.LearnableSoup(models, granularity=g), task, lambda i: batch,
                                       steps=args.soup_steps, lr=0.05)
            row[f"learned_{g}"] = acc(logits_of(learn.bake(), x)[test], y[test])
            row[f"learned_{g}_loss"] = [losses[0], losses[-1]]
            row[f"learned_{g}_weights"] = {k: v.tolist() for k, v in learn.coefficients().items()}
        base_model = zoo.create_model(MODEL, num_classes=10, weights=base)
        row["base"] = acc(logits_of(base_model, x)[test], y[test])
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("weights")}), flush=True)
        rows.append(row)
        write_json(work / "results.json", rows)

    keys = ["base", "mean_single", "best_single", "uniform_soup", "greedy_soup", "learned_model", "learned_layer",
            "ensemble"]
    lines = [f"| method | test top-1 (%), mean ± std over {len(rows)} reps of {args.k} fine-tunes |", "|---|---|"]
    lines += [f"| {k} | {mean_std([r[k] for r in rows])} |" for k in keys]
    (work / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
