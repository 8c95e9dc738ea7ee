"""Model throughput (inference or a full training step), one JSON line per run.

    python -m benchmarks.throughput --model starnet_s1 --mode infer --batch-size 32 --resolution 224
    python -m benchmarks.throughput --model starnet_s1,starnet_s2 --mode infer,train --dtype float32,bfloat16
    python -m benchmarks.throughput --model starnet_s1 --mode infer,train --vs-timm     # + PyTorch/timm
    python -m benchmarks.throughput --devices 4 --mode train --batch-size 64           # 4 simulated CPU devices
    python -m benchmarks.throughput --all-zoo                  # every zoo model once, infer, batch 2
    python -m benchmarks.throughput --all-zoo 'starnet_*' --resolution 64

``--model``, ``--mode``, ``--batch-size``, ``--resolution`` and ``--dtype`` take several values
(repeated or comma-separated); every combination is run, in one process.

What is measured:

* ``infer``: ``model.eval()``, then ``jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))``.
* ``train``: the real training step of ``lib.train.step.make_train_step`` (forward, label-smoothed
  (0.1) cross-entropy, backward, AdamW with weight decay 0.05 on >=2-D params, BatchNorm statistics
  update, state donated), no mixup, no EMA.
* ``compile_s``: ``jitted.lower(...).compile()`` (tracing + XLA compilation); ``first_call_s``: the
  first execution of the compiled program (not timed with the others).
* ``median_step_ms``: median over ``--steps`` timed calls after ``--warmup`` untimed ones, each
  ended by ``jax.block_until_ready``; ``images_per_s`` = batch / median step time.
* memory: ``compiled.memory_analysis()`` (argument, output, temp, alias bytes; ``xla_peak_bytes`` =
  argument + output + temp - alias) and the process RSS high-water mark (``rss_peak_mib``: VmHWM,
  else ``ru_maxrss``; it only grows over a grid, so it is an upper bound for every run after the
  first).
* ``other_cpu_pct``: CPU time other processes took during the timed steps, in % of all
  cores (from /proc/stat): anything well above 0 means the measurement was disturbed; re-run.

Threads: XLA:CPU runs one intra-op thread pool over every core the process may use. ``--threads N``
(default: all schedulable cores) pins this process (and the PyTorch subprocess) to the first N
cores before JAX starts, and the PyTorch side calls ``torch.set_num_threads(N)``, so both frameworks
get the same cores.

``--vs-timm`` runs the same architecture from timm (StarNet: the official PyTorch model; the DINOv2
ViTs: timm's ``vit_*_patch14_[reg4_]dinov2``, see ``TIMM_MODELS``) in its own interpreter
(``--torch-python``, default ``benchmarks/.torchenv/bin/python``; see ``benchmarks/README.md``), eager
and ``torch.compile``, same batch, resolution, classes and threads, and then prints the ratios of
JAX images/s to each. The PyTorch side is ``benchmarks/torch_side.py``.

ViTs with a learned position embedding (the ``dinov2_*`` models) are created for the benchmark's
resolution (``img_size=R``, recorded as ``model_img_size``; timm's counterpart likewise), so that
no call interpolates the position embedding.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import machine

HERE = Path(__file__).resolve().parent
DEFAULT_TORCH_PYTHON = HERE / ".torchenv" / "bin" / "python"
# Zoo model -> its timm counterpart: StarNet under the same name (timm >= 1.0.16), the DINOv2 ViTs
# as timm's ports (timm drops DINOv2's unused mask_token, and the *_reg4 ports store the position
# embedding without the CLS entry: see README, "DINOv2 ViTs against timm").
TIMM_MODELS = {
    **{name: name for name in ("starnet_s050", "starnet_s100", "starnet_s150", "starnet_s1", "starnet_s2",
                               "starnet_s3", "starnet_s4")},
    **{f"dinov2_vit{a}14{r}": f"vit_{size}_patch14_{'reg4_' if r else ''}dinov2"
       for a, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")) for r in ("", "_reg")},
}


def native_img_size(model_name: str) -> bool:
    """Models built for one input size (a learned position embedding over a fixed patch grid): the
    benchmark creates them at its resolution (``img_size=R``), on both sides."""
    return model_name.startswith("dinov2_")


def _split(values, cast=str):
    out = []
    for v in values or []:
        out.extend(cast(x.strip()) for x in str(v).split(",") if x.strip())
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="zoo model name(s); repeat or comma-separate "
                   "(default starnet_s1)")
    p.add_argument("--mode", action="append", help="infer and/or train (default infer)")
    p.add_argument("--batch-size", action="append", help="global batch size(s) (default 32)")
    p.add_argument("--resolution", action="append", help="image side(s) (default 224; with --all-zoo "
                   "each model's own input size)")
    p.add_argument("--dtype", action="append", help="float32 and/or bfloat16 compute dtype (params "
                   "stay float32; default float32)")
    p.add_argument("--devices", type=int, default=1, help="devices of the data mesh; on CPU this many "
                   "devices are simulated (jax_num_cpu_devices), set before JAX starts")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
    p.add_argument("--steps", type=int, default=10, help="timed calls")
    p.add_argument("--threads", type=int, default=None,
                   help="cores for both frameworks (default: all schedulable cores). XLA:CPU uses every "
                   "core the process may run on, so this pins the process to the first N cores; the "
                   "PyTorch side uses torch.set_num_threads(N)")
    p.add_argument("--conv-impl", default=None, help="lib.layers.conv implementation (auto, xla, fast) "
                   "for the JAX runs; default: the library's (auto)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="after timing, profile N more "
                   "calls and add the XLA op time per step by kind and the slowest ops (benchmarks/op_profile.py)")
    p.add_argument("--remat", action="store_true", help="create_model(..., remat=True) where supported")
    p.add_argument("--host-malloc", choices=("retain", "default"), default="retain",
                   help="retain (default, as the training CLI): lib.host_malloc.retain_freed_memory() in "
                   "both frameworks' processes before they start, so large buffers are not page-faulted "
                   "afresh every step; default: glibc's own settings")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--trainable", action="append", default=[], metavar="REGEX",
                   help="train mode: train only the parameters whose path matches (repeatable; "
                        "config.trainable of the training loop); the rest is frozen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-zoo", nargs="?", const="*", default=None, metavar="PATTERN",
                   help="smoke check: every zoo model (matching PATTERN) once, infer, batch 2, 1+1 steps")
    p.add_argument("--vs-timm", action="store_true", help="also run timm's PyTorch model (eager and "
                   "torch.compile) in --torch-python and print JAX/PyTorch ratios")
    p.add_argument("--torch-python", default=str(DEFAULT_TORCH_PYTHON),
                   help="interpreter of the PyTorch environment (default benchmarks/.torchenv/bin/python)")
    p.add_argument("--torch-variants", default="eager,compile", help="PyTorch variants to run")
    p.add_argument("--channels-last", action="store_true", help="PyTorch side: channels_last memory format")
    p.add_argument("--torch-warm-cache", action="store_true", help="PyTorch side: keep Inductor's on-disk "
                   "cache (default: an empty one per run, so torch.compile's compile_s is cold like JAX's)")
    p.add_argument("--torch-timeout", type=float, default=1800, help="seconds per PyTorch subprocess")
    args = p.parse_args(argv)
    args.model = _split(args.model) or ["starnet_s1"]
    args.mode = _split(args.mode) or ["infer"]
    args.batch_size = _split(args.batch_size, int) or [32]
    args.resolution = _split(args.resolution, int) or None
    args.dtype = _split(args.dtype) or ["float32"]
    for m in args.mode:
        if m not in ("infer", "train"):
            p.error(f"--mode must be infer or train, got {m!r}")
    for d in args.dtype:
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtype must be float32 or bfloat16, got {d!r}")
    if args.devices < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--devices and --steps must be >= 1, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------
# process set-up (before JAX starts)
# ------------------------------------------------------------------------------------------------
def _schedulable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _setup_process(args) -> None:
    """Malloc settings, thread pinning and simulated CPU devices: before the JAX backend starts."""
    from lib import host_malloc
    args.host_malloc_applied = args.host_malloc == "retain" and host_malloc.retain_freed_memory()
    cores = _schedulable_cores()
    if args.threads is None:
        args.threads = len(cores)
    elif args.threads < len(cores) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores[: args.threads])
    import jax
    from jax._src import xla_bridge
    initialized = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    if not initialized:
        if jax.config.jax_platforms in (None, "", "cpu") and args.devices > 1:
            jax.config.update("jax_num_cpu_devices", args.devices)
    if len(jax.devices()) < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {len(jax.devices())} {jax.default_backend()} "
                         "devices exist (JAX was started before the flag could take effect)")


# ------------------------------------------------------------------------------------------------
# JAX side
# ------------------------------------------------------------------------------------------------
def _environment() -> dict:
    import flax
    import jax
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(), "flax": flax.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        m = None
    if m is None:
        return {"xla_peak_bytes": None}
    get = lambda name: int(getattr(m, name, 0) or 0)
    out = {k: get(f"{k}_size_in_bytes") for k in ("argument", "output", "temp", "alias", "generated_code")}
    out = {f"xla_{k}_bytes": v for k, v in out.items()}
    out["xla_peak_bytes"] = (out["xla_argument_bytes"] + out["xla_output_bytes"] + out["xla_temp_bytes"]
                             - out["xla_alias_bytes"])
    return out


def _conv_impl_name():
    try:
        from lib.layers import conv
    except ImportError:
        return None
    impl = getattr(conv, "_conv_impl", None)
    if impl == "auto" and hasattr(conv, "use_fast_path"):
        return f"auto ({'fast' if conv.use_fast_path() else 'xla'})"
    return impl


def _conv_impl_context(impl: str | None):
    """Select ``lib.layers.conv``'s implementation for the runs, restoring it afterwards."""
    if impl is None:
        return contextlib.nullcontext()
    from lib.layers import conv
    if not hasattr(conv, "conv_impl"):
        raise SystemExit("--conv-impl: this version of lib.layers.conv has no conv_impl switch")
    return conv.conv_impl(impl)


def _create(name, num_classes, dtype, remat, mesh, seed, img_size=None):
    import jax.numpy as jnp
    from lib import zoo
    kw = {} if img_size is None else {"img_size": img_size}
    if dtype == "bfloat16":
        kw["dtype"] = jnp.bfloat16
    if remat:
        kw["remat"] = True
    return zoo.create_model(name, num_classes=num_classes, rngs=seed, mesh=mesh, **kw)


def run_jax(model_name: str, mode: str, batch: int, resolution: int | None, dtype: str, args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from lib import sharding, zoo
    from lib.tasks.classification import Classification
    from lib.train import optim, step as step_lib

    one = zoo.model_info(model_name).example_input   # one input's shape and dtype, no batch axis
    # (H, W, C) images: --resolution replaces H and W; points (the 2-D toy), token ids: no resolution
    res = (resolution or one.shape[0]) if len(one.shape) == 3 else None
    example = zoo.example_input(model_name, batch, resolution=res)
    shape = example.shape
    result = {"framework": "jax", "model": model_name, "mode": mode, "batch": batch, "resolution": res,
              "dtype": dtype, "devices": args.devices, "threads": args.threads, "remat": bool(args.remat),
              "host_malloc": args.host_malloc, "host_malloc_applied": args.host_malloc_applied,
              "conv_impl": _conv_impl_name()}
    img_size = res if res is not None and native_img_size(model_name) else None
    if img_size is not None:
        result["model_img_size"] = img_size
    if batch % args.devices:
        return {**result, "error": f"batch {batch} does not divide over {args.devices} devices"}

    mesh = sharding.make_mesh((("data", args.devices),), devices=jax.devices()[: args.devices]) \
        if args.devices > 1 else None
    try:
        model = _create(model_name, args.num_classes, dtype, args.remat, mesh, args.seed, img_size)
    except TypeError as e:
        if args.remat and "remat" in str(e):
            return {**result, "remat": "unsupported", "error": f"remat unsupported: {e}"}
        raise
    result["num_params"] = zoo.count_params(model)

    rng = np.random.default_rng(args.seed)
    if np.issubdtype(example.dtype, np.integer):   # e.g. token ids: 0 is in every vocabulary
        images = np.zeros(shape, example.dtype)
    else:
        images = rng.standard_normal(shape, dtype=np.float32).astype(example.dtype)
    labels = rng.integers(0, args.num_classes, (batch,), dtype=np.int32)
    if mesh is not None:
        img_sh = sharding.batch_sharding(mesh, ndim=len(shape))
        lbl_sh = sharding.batch_sharding(mesh, ndim=1)
    else:
        img_sh = lbl_sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    images, labels = jax.device_put(images, img_sh), jax.device_put(labels, lbl_sh)

    if mode == "infer":
        model.eval()
        graphdef, state = nnx.split(model)
        del model
        if mesh is not None:
            st_sh = jax.tree.map(lambda x: x.sharding, state)
            fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), in_shardings=(st_sh, img_sh))
        else:
            fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        compiled, compile_s = machine.compile_timed(fn, state, images)

        def call():
            return compiled(state, images)
    else:
        model.train()
        tx = optim.make_optimizer(lambda s: 1e-3)
        trainable = step_lib.trainable_filter(nnx.Param, args.trainable)
        graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False, trainable=trainable)
        result.update(trainable=args.trainable, trained_params=sum(x.size for x in jax.tree.leaves(state["params"])))
        del model
        task = Classification(args.num_classes, label_smoothing=0.1)
        if mesh is not None:
            st_sh = step_lib.shardings_of(state)
            b_sh = {"image": img_sh, "label": lbl_sh}
        else:
            st_sh = b_sh = None
        fn = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, base_key=jax.random.key(args.seed),
                                      trainable=trainable, state_shardings=st_sh, batch_shardings=b_sh, donate=True)
        batch_tree = {"image": images, "label": labels}
        compiled, compile_s = machine.compile_timed(fn, state, batch_tree)
        box = [state]
        del state

        def call():
            box[0], metrics = compiled(box[0], fn.frozen, batch_tree, fn.consts)  # state donated: thread it through
            return box[0], metrics

    out = measure(result, compiled, call, compile_s, batch, args)
    if mode == "train":
        result["final_loss"] = final_loss(out[1])
    return result


def measure(result: dict, compiled, call, compile_s: float, batch: int, args):
    """Time ``call()`` (``compiled``'s program) as every JAX row is timed and add the row's fields:
    ``images_per_s``, the step-time statistics, compile and first-call seconds, XLA memory, the
    environment, and with ``args.profile`` the op profile. Returns the last output."""
    import jax
    first_call_s, times, out, cpu0, cpu1 = machine.time_calls(call, args.warmup, args.steps,
                                                              wait=jax.block_until_ready)
    result.update({
        "images_per_s": round(batch / statistics.median(times), 2),
        **machine.call_stats(times, cpu0, cpu1),
        "steps": args.steps, "warmup": args.warmup,
        "compile_s": round(compile_s, 2), "first_call_s": round(first_call_s, 2),
        **_memory(compiled),
        **_environment(),
    })
    if args.profile:
        from benchmarks import op_profile
        result["op_profile"] = op_profile.profile(compiled, call, steps=args.profile)
        print(op_profile.format_report(result["op_profile"]), file=sys.stderr, flush=True)
    return out


def final_loss(metrics):
    """A train step's logged ``loss`` as a rounded float (or its string if not finite)."""
    import jax
    import numpy as np
    loss = float(jax.device_get(metrics["loss"]))
    return round(loss, 4) if np.isfinite(loss) else str(loss)


# ------------------------------------------------------------------------------------------------
# PyTorch side (another interpreter)
# ------------------------------------------------------------------------------------------------
def run_torch(model_name: str, mode: str, batch: int, resolution: int, dtype: str, args) -> list[dict]:
    base = {"framework": "torch", "model": model_name, "mode": mode, "batch": batch,
            "resolution": resolution, "dtype": dtype, "threads": args.threads}
    if model_name not in TIMM_MODELS:
        return [{**base, "error": f"no timm counterpart for {model_name}"}]
    timm_name = TIMM_MODELS[model_name]
    base["timm_model"] = timm_name
    if not Path(args.torch_python).exists():
        return [{**base, "error": f"PyTorch interpreter {args.torch_python} not found; "
                                  "see benchmarks/README.md (PyTorch comparison environment)"}]
    rows = []
    for variant in _split([args.torch_variants]):
        cmd = [str(args.torch_python), str(HERE / "torch_side.py"), "--model", timm_name, "--mode", mode,
               "--batch-size", str(batch), "--resolution", str(resolution), "--dtype", dtype,
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--variant", variant, "--seed", str(args.seed), "--num-classes", str(args.num_classes),
               "--host-malloc", args.host_malloc]
        if native_img_size(model_name):
            cmd += ["--img-size", str(resolution)]
        if args.channels_last:
            cmd.append("--channels-last")
        if args.torch_warm_cache:
            cmd.append("--warm-inductor-cache")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
        env["OMP_NUM_THREADS"] = str(args.threads)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torch_timeout, env=env)
        except subprocess.TimeoutExpired:
            rows.append({**base, "variant": variant, "error": f"timed out after {args.torch_timeout}s"})
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append({**base, "variant": variant, "error": f"exit {proc.returncode}: "
                                                             f"{(proc.stderr or proc.stdout).strip()[-800:]}"})
            continue
        row = json.loads(lines[-1])   # "model": the zoo name on both sides, "timm_model": timm's
        rows.append({**row, "model": model_name, "timm_model": timm_name})
    return rows


def ratios(jax_row: dict, torch_rows: list[dict]) -> dict:
    out = {"ratio": "jax_images_per_s / timm_images_per_s", "model": jax_row["model"], "mode": jax_row["mode"],
           "batch": jax_row["batch"], "resolution": jax_row["resolution"], "dtype": jax_row["dtype"],
           "jax_images_per_s": jax_row.get("images_per_s"), "jax_num_params": jax_row.get("num_params")}
    for row in torch_rows:
        if row.get("num_params") is not None:
            out.setdefault("timm_num_params", row["num_params"])
        v = row.get("variant", "?")
        key = {"eager": "timm_eager", "compile": "timm_compiled"}.get(v, f"timm_{v}")
        ips = row.get("images_per_s")
        out[f"{key}_images_per_s"] = ips
        j = jax_row.get("images_per_s")
        out[f"jax_over_{key}"] = round(j / ips, 3) if j and ips else None
    return out


# ------------------------------------------------------------------------------------------------
def _emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    _setup_process(args)          # before anything below initialises JAX
    from lib import zoo

    with _conv_impl_context(args.conv_impl):
        return _run_all(args, zoo)


def _run_all(args, zoo) -> list[dict]:
    rows: list[dict] = []
    if args.all_zoo is not None:
        args.steps, args.warmup = 1, 1
        resolution = args.resolution[0] if args.resolution else None
        for name in zoo.list_models(args.all_zoo):
            try:
                _emit(run_jax(name, "infer", 2, resolution, args.dtype[0], args), rows)
            except Exception as e:  # noqa: BLE001 (a smoke check reports every failure)
                _emit({"framework": "jax", "model": name, "mode": "infer", "error": f"{type(e).__name__}: {e}"},
                      rows)
        return rows

    resolutions = args.resolution or [224]
    for name, mode, batch, res, dtype in itertools.product(args.model, args.mode, args.batch_size, resolutions,
                                                           args.dtype):
        jax_row = run_jax(name, mode, batch, res, dtype, args)
        _emit(jax_row, rows)
        if args.vs_timm and "error" not in jax_row:
            torch_rows = run_torch(name, mode, batch, res, dtype, args)
            for row in torch_rows:
                _emit(row, rows)
            _emit(ratios(jax_row, torch_rows), rows)
    return rows


if __name__ == "__main__":
    main()
