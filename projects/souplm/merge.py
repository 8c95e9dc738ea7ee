"""Merge LLaMA-family checkpoints (HF directories or .gguf files) tensor by tensor into an HF directory.

    python -m projects.souplm.merge --method uniform --models A B --out OUT
    python -m projects.souplm.merge --method linear --models A B --weights 0.3 0.7 --out OUT
    python -m projects.souplm.merge --method task_arithmetic --models A B --base BASE --weights 1 0.5 --out OUT
    python -m projects.souplm.merge --method ties --models A B C --base BASE --density 0.5 --out OUT
    python -m projects.souplm.merge --method slerp --models A B --t 0.4 --out OUT
    python -m projects.souplm.merge --method soup --models A B --soup-weights RUN/soup_weights.json --out OUT

See ``lib.merge`` for each method's exact semantics (mergekit's) and the checks made before any work.
"""
from __future__ import annotations

import argparse
import sys
import time

from lib import merge


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=merge.METHODS)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base")
    ap.add_argument("--weights", nargs="+", type=float)
    ap.add_argument("--t", type=float, default=0.5, help="slerp: 0 = the first model, 1 = the second")
    ap.add_argument("--density", type=float, default=1.0, help="ties: fraction of each task vector kept")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="task_arithmetic/ties: scale of the merged delta")
    ap.add_argument("--normalize", action="store_true", help="linear: divide by the sum of the weights")
    ap.add_argument("--soup-weights", help="soup: the soup_weights.json of a learnable-soup run")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--max-shard-gb", type=float, default=1.0)
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        out = merge.merge_checkpoints(a.models, a.out, method=a.method, weights=a.weights, base=a.base, t=a.t,
                                      density=a.density, lam=a.lam, normalize=a.normalize,
                                      soup_weights=a.soup_weights, dtype=a.dtype, overwrite=a.overwrite,
                                      max_shard_bytes=int(a.max_shard_gb * 2 ** 30))
    except (merge.MergeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({a.method}, {len(a.models)} models) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
