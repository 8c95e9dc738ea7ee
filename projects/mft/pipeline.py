"""Mask Fine-Tuning end to end, with upstream's baselines, and a comparison table:

    python -m projects.mft.pipeline --config configs/mft/tiny.py --workdir /tmp/mft_tiny          # ~1 min on a CPU
    python -m projects.mft.pipeline --config configs/mft/smollm2.py --workdir W --baselines --seed 1

Stages (each skipped when its output exists, so an interrupted pipeline resumes):
  1. ``fft``   full fine-tuning from the config's ``init_from``       -> W/fft,  exported to W/fft_hf
  2. ``mft``   masks over the FFT weights, only the scores trained   -> W/mft,  baked to W/mft_hf (+ masks)
  3. with ``--baselines``: continued FFT for as many steps (W/cfft_hf), and upstream's random and L1
     masks over the FFT weights in the same layers (W/random_hf, W/l1_hf)
  4. every exported checkpoint evaluated on the eval split: token loss / accuracy on the assistant
     tokens and, for the arithmetic data, exact match of greedy answers -> W/results.json

The config file must accept ``stage=fft|mft`` and ``init_from=PATH`` in its argument string (as
``configs/mft/*.py`` do); ``--arg`` adds more (``--arg layers=4-7,keep=0.9``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from lib.train import loop
from projects.mft import evaluate, export, task  # noqa: F401  (task registers "mft")


def load_config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("mft_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _arg(*parts) -> str:
    return ",".join(p for p in parts if p)


def run(config_path: str, workdir: str | Path, *, extra_arg: str = "", baselines: bool = False,
        seed: int = 0, log=print) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings, checkpoints = {}, {}

    def config(stage, init_from=""):
        c = load_config(config_path, _arg(f"stage={stage}", f"init_from={init_from}" if init_from else "", extra_arg))
        c.seed = seed
        c.checkpoint_every = c.total_steps or 10 ** 9   # a final checkpoint for the export
        return c

    def stage(name, cfg, *, out, **export_kw):
        run_dir = workdir / name.split("+")[0]
        if not (out / "config.json").exists():
            t = time.time()
            if not export_kw.get("baseline"):
                log(f"== {name}: training in {run_dir}")
                loop.run(cfg, run_dir)
            export.export(cfg, run_dir, out, dtype="float32", overwrite=True, **export_kw)
            timings[name] = round(time.time() - t, 1)
        checkpoints[name.split("+")[-1]] = out

    fft_cfg = config("fft")
    stage("fft", fft_cfg, out=workdir / "fft_hf")
    mft_cfg = config("mft", str(workdir / "fft_hf"))
    stage("mft", mft_cfg, out=workdir / "mft_hf")
    if baselines:
        stage("cfft", config("fft", str(workdir / "fft_hf")), out=workdir / "cfft_hf")
        for kind in ("random", "l1"):
            stage(f"fft+{kind}", fft_cfg, out=workdir / f"{kind}_hf", baseline=kind, baseline_seed=seed)

    results = {}
    for name, path in checkpoints.items():
        t = time.time()
        results[name] = evaluate.evaluate_checkpoint(path, fft_cfg)
        timings[f"eval_{name}"] = round(time.time() - t, 1)
        log(f"{name:>7}: " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in results[name].items()))
    out = {"config": config_path, "arg": extra_arg, "seed": seed, "results": results, "seconds": timings}
    (workdir / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--arg", default="", help="more config arguments, e.g. layers=4-7,keep=0.9")
    p.add_argument("--baselines", action="store_true", help="also continued FFT, random and L1 masks")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        run(args.config, args.workdir, extra_arg=args.arg, baselines=args.baselines, seed=args.seed)
    except (loop.ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
