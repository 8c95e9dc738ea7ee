"""The small-scale MFT study: a layer-group sweep, then FFT / MFT / continued FFT / random / L1 over
seeds, as a table and a plot (``projects/mft/results/``):

    python -m projects.mft.study --config configs/mft/smollm2.py --workdir W --seeds 0 1 2 \\
        --sweep 0-3 13-16 26-29

1. seed ``seeds[0]``: FFT once, then MFT for every layer group of ``--sweep`` (the paper picks the
   group per domain from such an ablation); the group with the best held-out metric is kept;
2. for every seed: the full pipeline with baselines on that group (``W/s<seed>``; FFT is re-run per
   seed: the seed changes the data order and the initial scores);
3. mean +- std over seeds per method, and the wall time of each stage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from lib.stats import mean_std
from projects.mft import pipeline

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fft", "mft", "cfft", "random", "l1")
LABELS = {"fft": "FFT", "mft": "MFT", "cfft": "continued FFT", "random": "random mask", "l1": "L1 mask"}


def _link_fft(src: Path, dst: Path) -> None:
    """Share one FFT run between pipelines (stages whose output exists are skipped)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("fft", "fft_hf"):
        if not (dst / name).exists():
            os.symlink((src / name).resolve(), dst / name)


def run(config: str, workdir: Path, *, seeds, sweep, metric: str = "exact_match", results_dir: Path = RESULTS,
        name: str = "smollm2") -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    first = workdir / f"s{seeds[0]}"
    sweep_rows = {}
    best_group = sweep[0]
    if len(sweep) > 1:
        pipeline.run(config, first, extra_arg=f"layers={sweep[0]}", seed=seeds[0])
        for group in sweep:
            d = first if group == sweep[0] else workdir / f"sweep_{group}"
            if d != first:
                _link_fft(first, d)
            out = pipeline.run(config, d, extra_arg=f"layers={group}", seed=seeds[0])
            sweep_rows[group] = out["results"]["mft"]
        fft_score = out["results"]["fft"][metric]
        # ties on the metric (e.g. exact match 0 everywhere at small budgets) go to the lower held-out loss
        best_group = max(sweep, key=lambda g: (sweep_rows[g][metric], -sweep_rows[g]["loss"]))
        print(f"layer sweep ({metric}, FFT {fft_score:.4f}): " +
              ", ".join(f"{g}: {r[metric]:.4f}" for g, r in sweep_rows.items()) + f" -> {best_group}")
    outs = {}
    for seed in seeds:
        d = workdir / f"s{seed}"
        if seed == seeds[0] and best_group != sweep[0]:
            d = workdir / f"s{seed}_{best_group}"
            _link_fft(first, d)
        outs[seed] = pipeline.run(config, d, extra_arg=f"layers={best_group}", baselines=True, seed=seed)
    return report(outs, config=config, layers=best_group, sweep_rows=sweep_rows, metric=metric,
                  results_dir=results_dir, name=name)


def report(outs: dict, *, config: str, layers: str, sweep_rows: dict, metric: str, results_dir: Path,
           name: str) -> dict:
    """Mean +- std over the seeds' pipeline outputs (``{seed: results.json}``); table, plot, json."""
    seeds = sorted(outs)
    per_seed = {seed: outs[seed]["results"] for seed in seeds}
    seconds = {seed: outs[seed]["seconds"] for seed in seeds}
    best_group = layers
    summary = {m: {k: mean_std([per_seed[s][m][k] for s in seeds])
                   for k in per_seed[seeds[0]][m]} for m in METHODS}
    report = {"config": config, "seeds": list(seeds), "layers": best_group, "sweep": sweep_rows,
              "per_seed": per_seed, "summary": summary, "seconds": seconds}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results_dir / f"{name}_table.md").write_text(table(report, metric))
    plot(report, metric, results_dir / f"{name}.png")
    print(table(report, metric))
    return report


def table(report: dict, metric: str) -> str:
    s = report["summary"]
    lines = [f"| method | {metric} (mean ± std) | eval loss | token accuracy |", "|---|---|---|---|"]
    for m in METHODS:
        e, l, a = s[m][metric], s[m]["loss"], s[m]["accuracy"]
        lines.append(f"| {LABELS[m]} | {100 * e[0]:.1f} ± {100 * e[1]:.1f} | {l[0]:.4f} ± {l[1]:.4f} | "
                     f"{100 * a[0]:.1f} ± {100 * a[1]:.1f} |")
    lines.append(f"\n{len(report['seeds'])} seeds; MFT masks layers {report['layers']} (10% of each projection).")
    if report["sweep"]:
        lines.append("Layer-group sweep (seed {}), MFT {}: ".format(report["seeds"][0], metric) +
                     ", ".join(f"{g}: {100 * r[metric]:.1f} (loss {r['loss']:.4f})"
                               for g, r in report["sweep"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(report: dict, metric: str, path: Path) -> None:
    """Held-out token loss and ``metric`` per method: bars = mean over seeds, dots = each seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = report["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = ["C0", "C3", "C1", "C7", "C2"]
    for ax, key, scale, label in ((axes[0], "loss", 1, "eval loss (assistant tokens)"),
                                  (axes[1], metric, 100, f"{metric} (%)")):
        ax.bar([LABELS[m] for m in METHODS], [scale * s[m][key][0] for m in METHODS],
               yerr=[scale * s[m][key][1] for m in METHODS], capsize=4, color=colors)
        for i, seed in enumerate(report["seeds"]):
            ax.scatter(range(len(METHODS)), [scale * report["per_seed"][seed][m][key] for m in METHODS],
                       color="k", s=10, zorder=3, label="seeds" if i == 0 else None)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=20)
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M-Instruct on arithmetic chats: MFT on layers {report['layers']}, "
                 f"{len(report['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sweep", nargs="+", default=["0-3"], help="layer groups a-b; the best is used for the seeds")
    p.add_argument("--metric", default="exact_match")
    p.add_argument("--name", default="smollm2")
    p.add_argument("--collect", nargs="+", metavar="RESULTS_JSON",
                   help="only tabulate finished pipelines' results.json files (no training)")
    p.add_argument("--collect-sweep", metavar="SWEEP_JSON", default="",
                   help="with --collect: a finished sweep, {group: pipeline results}, for the table")
    args = p.parse_args(argv)
    if args.collect:
        outs = {}
        for f in args.collect:
            out = json.loads(Path(f).read_text())
            outs[out["seed"]] = out
        layers = dict(x.split("=") for x in (outs[min(outs)]["arg"] or "layers=0-3").split(",")).get("layers", "0-3")
        sweep_rows = {}
        if args.collect_sweep:
            sweep_rows = {g: r["mft"] for g, r in json.loads(Path(args.collect_sweep).read_text()).items()}
        report(outs, config=args.config, layers=layers, sweep_rows=sweep_rows, metric=args.metric,
               results_dir=RESULTS, name=args.name)
        return 0
    run(args.config, Path(args.workdir), seeds=args.seeds, sweep=args.sweep, metric=args.metric, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
