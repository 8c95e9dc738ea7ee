"""The PyTorch half of ``benchmarks/throughput.py --vs-timm``: timm's model, one JSON line.

Runs in its own interpreter (``benchmarks/.torchenv``, see ``benchmarks/README.md``); it imports
neither JAX nor the repository's models, only ``lib/host_malloc.py`` (plain ``ctypes``), so that both
sides run with the same malloc settings.

    benchmarks/.torchenv/bin/python benchmarks/torch_side.py --model starnet_s1 --mode train \
        --batch-size 32 --resolution 224 --threads 2 --variant compile

* the model: ``timm.create_model(name, pretrained=False, num_classes=N)``, with ``--img-size R`` also
  ``img_size=R`` (ViTs built for the input size, e.g. ``vit_small_patch14_dinov2``: no position
  embedding interpolation per call).
* ``infer``: ``model.eval()`` under ``torch.inference_mode()``.
* ``train``: ``model.train()``; forward, ``CrossEntropyLoss(label_smoothing=0.1)``, backward, AdamW
  (lr 1e-3, weight decay 0.05 on >=2-D params only, as the JAX side) step, ``zero_grad``.
* ``--variant eager`` or ``compile`` (``torch.compile(model)``; for training the optimizer step is
  compiled too). A failing ``torch.compile`` is reported in the JSON line (``error``), exit 0.
* ``--host-malloc retain`` (default) or ``default``: ``lib.host_malloc.retain_freed_memory()`` before
  torch starts, as the JAX side does.
* ``other_cpu_pct``: CPU other processes took during the timed steps (% of all cores).
* ``compile_s``: the first call (for ``compile``: Dynamo + Inductor compilation and one step), by
  default with an empty Inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``), i.e. a cold compile
  as on the JAX side; ``--warm-inductor-cache`` keeps the user's cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import traceback

import machine  # benchmarks/machine.py: this script's folder is on sys.path when run as a script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import host_malloc  # noqa: E402  (ctypes only; the repository root was just put on sys.path)

_TV_LIB = None


def _import_timm():
    """``import timm``, working around a CUDA-built torchvision next to a CPU-only torch.

    PyPI's torchvision wheels link CUDA; with the CPU torch their C++ ops do not load, and
    torchvision then fails at import registering fake kernels for ``torchvision::nms`` / ``qnms``
    (RuntimeError "operator torchvision::nms does not exist"). Defining those two schemas lets it
    import; neither timm's StarNet nor its ViTs use a torchvision operator.
    """
    global _TV_LIB
    import torch
    try:
        import timm
        return timm, False
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]
    _TV_LIB = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm
    return timm, True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="starnet_s1", help="timm model name")
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: torch.autocast('cpu', bfloat16), params stay float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variant", choices=("eager", "compile"), default="eager")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--img-size", type=int, default=None,
                   help="timm.create_model(..., img_size=N): a ViT built for this input size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-malloc", choices=("retain", "default"), default="retain",
                   help="retain: lib.host_malloc.retain_freed_memory() before torch starts (as the JAX side)")
    p.add_argument("--warm-inductor-cache", action="store_true",
                   help="keep Inductor's on-disk cache (default: a fresh empty one, so compile_s is a cold "
                   "compile like JAX's)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.host_malloc_applied = args.host_malloc == "retain" and host_malloc.retain_freed_memory()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    threads = args.threads or len(cores)
    if threads < len(cores) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores[:threads])  # the same cores as the JAX process
    cache_dir = None
    if not args.warm_inductor_cache:   # must be set before torch is imported
        cache_dir = tempfile.mkdtemp(prefix="torchinductor_bench_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        return _run(args, threads)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)


def _run(args, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    timm, tv_workaround = _import_timm()
    torch.manual_seed(args.seed)

    row = {"framework": "torch", "variant": args.variant, "model": args.model, "mode": args.mode,
           "batch": args.batch_size, "resolution": args.resolution, "dtype": args.dtype,
           "channels_last": args.channels_last, "host_malloc": args.host_malloc,
           "host_malloc_applied": args.host_malloc_applied, "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__,
           "timm": timm.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "torchvision_workaround": tv_workaround,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "inductor_cache": "warm" if args.warm_inductor_cache else "cold"}
    kw = {} if args.img_size is None else {"img_size": args.img_size}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kw)
    if args.img_size is not None:
        row["model_img_size"] = args.img_size
    row["num_params"] = sum(p.numel() for p in model.parameters())
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution).contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    if args.mode == "infer":
        model.eval()
        fwd = torch.compile(model) if args.variant == "compile" else model

        def step():
            with torch.inference_mode(), autocast():
                return fwd(x)
    else:
        model.train()
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
        try:
            opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)   # fused CPU kernel (torch >= 2.4)
            row["optimizer"] = "AdamW(fused)"
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(groups, lr=1e-3)
            row["optimizer"] = "AdamW"
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        fwd = torch.compile(model) if args.variant == "compile" else model
        opt_step = torch.compile(opt.step) if args.variant == "compile" else opt.step

        def step():
            with autocast():
                loss = criterion(fwd(x), y)
            loss.backward()
            opt_step()
            opt.zero_grad(set_to_none=True)
            return loss

    try:
        compile_s, times, out, cpu0, cpu1 = machine.time_calls(step, args.warmup, args.steps)
    except Exception as e:  # noqa: BLE001 (e.g. torch.compile without a working C++ compiler)
        row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        row["traceback_tail"] = traceback.format_exc()[-1500:]
        print(json.dumps(row), flush=True)
        return row
    if args.mode == "train":
        row["final_loss"] = round(float(out.detach()), 4)
    med = statistics.median(times)
    row.update({
        "images_per_s": round(args.batch_size / med, 2),
        **machine.call_stats(times, cpu0, cpu1),
        "steps": args.steps, "warmup": args.warmup,
        "compile_s": round(compile_s, 2),
    })
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
