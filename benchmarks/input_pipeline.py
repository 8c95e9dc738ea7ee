"""Throughput of the input pipeline alone (no model, no device transfer), as one JSON line.

    python -m benchmarks.input_pipeline --dataset digits --batch-size 128 --steps 50 \
        --image-size 224 --auto-augment rand-m9-mstd0.5-inc1

The first ``--warmup`` batches (thread / worker start-up, first reads) are not timed. The consumer
does nothing but pull batches, so after the warm-up the timed rate is the steady production rate
of the pipeline, not a drain of batches buffered in advance.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from lib import data


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=data.DATASETS)
    parser.add_argument("--name", default=None, help="TFDS dataset name (dataset=tfds)")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir or image-folder root")
    parser.add_argument("--batch-size", type=int, default=128, help="per-process batch size")
    parser.add_argument("--steps", type=int, default=50, help="timed batches")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--auto-augment", default=None, help="e.g. rand-m9-mstd0.5-inc1")
    parser.add_argument("--reprob", type=float, default=0.0)
    parser.add_argument("--interpolation", default="bicubic")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="default: the config default")
    parser.add_argument("--eval", action="store_true", help="time the eval pipeline (cycled) instead")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = data.default_input_config()
    cfg.dataset, cfg.image_size, cfg.interpolation = args.dataset, args.image_size, args.interpolation
    cfg.name, cfg.data_dir, cfg.auto_augment = args.name, args.data_dir, args.auto_augment
    cfg.reprob, cfg.num_workers = args.reprob, args.num_workers
    if args.num_threads is not None:
        cfg.num_threads = cfg.prefetch = args.num_threads
    pipe = data.make_pipeline(cfg, train=not args.eval, batch_size=args.batch_size, seed=args.seed,
                              process_index=0, process_count=1)

    iterators = []

    def batches():  # eval pipelines are finite: cycle them for as long as needed
        while True:
            iterators.append(iter(pipe))
            yield from iterators[-1]
            if pipe.train:
                return

    stream = batches()
    try:
        for _ in range(args.warmup):
            next(stream)
        start = time.perf_counter()
        for _ in range(args.steps):
            batch = next(stream)
        elapsed = time.perf_counter() - start
    finally:
        for it in iterators:  # frees grain's worker processes and shared memory (num_workers > 0)
            if hasattr(it, "close"):
                it.close()
    result = {
        "benchmark": "input_pipeline", "dataset": args.dataset, "train": not args.eval,
        "batch_size": args.batch_size, "image_size": args.image_size, "auto_augment": args.auto_augment,
        "reprob": args.reprob, "num_workers": args.num_workers, "num_threads": cfg.num_threads,
        "cpu_count": os.cpu_count(), "steps": args.steps,
        "images_per_s": round(args.steps * args.batch_size / elapsed, 1),
        "ms_per_batch": round(1000 * elapsed / args.steps, 2),
        "batch_shape": list(batch["image"].shape),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
