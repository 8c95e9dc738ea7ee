"""The PEMN representation-potential curve on digits: every strategy over several seeds.

    python -m projects.pemn.sweep --workdir DIR [--seeds 3] [--epochs 15] [--quick] [--model convmixer]

Points (the paper's x-axis): dense, mask, one_layer, MP, RP 1e-1 ... 1e-5. Each (point, seed) is
one ``lib.train.loop.run`` of ``configs/pemn/digits.py`` in ``DIR/<point>/seed<k>`` (a finished run
is only re-evaluated, so an interrupted sweep continues). Writes ``DIR/results.json``,
``DIR/table.md`` (mean ± std top-1, unique values, storage) and ``DIR/curve.png`` (accuracy vs
unique values and vs storage). ``--quick``: 2 epochs, 1 seed (a smoke run).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

POINTS = [("dense", None), ("mask", None), ("one_layer", None), ("mp", None)] + \
         [("rp", 10.0 ** -k) for k in range(1, 6)]


def point_name(strategy: str, ratio: float | None) -> str:
    return f"rp_{ratio:.0e}" if strategy == "rp" else strategy


def config_arg(strategy, ratio, seed, args) -> str:
    arg = f"strategy={strategy},seed={seed},epochs={args.epochs},model={args.model},width={args.width}," \
          f"depth={args.depth},image_size={args.image_size}"
    return arg + (f",ratio={ratio}" if ratio is not None else "")


def accounting(config, strategy: str, ratio: float | None) -> dict:
    """Unique values and storage bits of a point, from the shapes of its (abstract) masked model."""
    from lib import zoo
    from lib.layers import prototypes
    kwargs = dict(config.model.kwargs)
    kwargs["masked"] = True                       # the dense point is measured on the same shapes
    model = zoo.create_model(config.model.name, num_classes=config.num_classes, abstract=True, **kwargs)
    kind = {"dense": "dense", "mask": "iid"}.get(strategy, strategy)
    return prototypes.model_storage(model, kind, ratio or 1.0)


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for strategy, ratio in POINTS:
        name = point_name(strategy, ratio)
        accs = [r["top1"] for r in rows if r["point"] == name]
        if not accs:
            continue
        first = next(r for r in rows if r["point"] == name)
        table.append({"point": name, "seeds": len(accs), "top1_mean": float(np.mean(accs)),
                      "top1_std": float(np.std(accs)), **first["storage"]})
    return table


def write_table(table: list[dict], path: Path, header: str) -> str:
    lines = [header, "", "| point | top-1 (mean ± std) | seeds | unique values | storage (KB) | vs dense |",
             "|---|---|---|---|---|---|"]
    for t in table:
        kb = t["total_bits"] / 8 / 1024
        lines.append(f"| {t['point']} | {100 * t['top1_mean']:.1f} ± {100 * t['top1_std']:.1f} | {t['seeds']} | "
                     f"{t['unique_values']:,} | {kb:.1f} | {t['total_bits'] / t['dense_bits']:.3f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(table: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "unique_values", "unique weight values"),
                           (axes[1], "total_bits", "storage (bits: float32 values + 1-bit masks)")):
        x = [t[key] for t in table]
        y = [100 * t["top1_mean"] for t in table]
        ax.errorbar(x, y, yerr=[100 * t["top1_std"] for t in table], fmt="o-", capsize=3)
        for t, xi, yi in zip(table, x, y):
            ax.annotate(t["point"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("PEMN on digits: accuracy vs parameter efficiency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--model", default="convmixer", choices=("convmixer", "vit"))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, 1

    import jax
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from configs.pemn import digits
    from lib.train import loop

    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    # Every masked point compiles the same programs: share them through the persistent cache.
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    rows, t0 = [], time.time()
    for strategy, ratio in POINTS:
        name = point_name(strategy, ratio)
        for seed in range(args.seeds):
            config = digits.get_config(config_arg(strategy, ratio, seed, args))
            start = time.time()
            (workdir / name).mkdir(exist_ok=True)
            result = loop.run(config, workdir / name / f"seed{seed}")
            if result.get("preempted"):   # SIGTERM: the run saved its checkpoint; rerun the sweep to continue
                print(f"sweep: stopped by a signal during {name} seed {seed}", flush=True)
                return None
            rows.append({"point": name, "seed": seed, "top1": result["top1"], "seconds": time.time() - start,
                         "storage": accounting(config, strategy, ratio)})
            print(f"sweep: {name} seed {seed}: top1={result['top1']:.4f} ({time.time() - start:.0f} s)", flush=True)
    table = summarize(rows)
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "runs": rows, "table": table}, indent=2))
    header = (f"PEMN on digits ({args.image_size}x{args.image_size}), {args.model} width {args.width} depth "
              f"{args.depth}, keep 0.5, {args.epochs} epochs, {args.seeds} seed(s); {time.time() - t0:.0f} s in all")
    print(write_table(table, workdir / "table.md", header))
    plot(table, workdir / "curve.png")
    print(f"sweep: wrote {workdir / 'table.md'}, {workdir / 'curve.png'}, {workdir / 'results.json'}")
    return table


if __name__ == "__main__":
    main()
