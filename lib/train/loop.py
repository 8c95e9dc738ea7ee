"""The one generic training loop: config in, trained and evaluated model out.

    from lib.train import loop
    result = loop.run(config, workdir)     # also: python -m projects.<paper>.train --config ... --workdir ...

Flow: mesh -> model created sharded (or restored) -> data pipelines -> jitted steps -> train with
periodic eval and checkpoints -> final evaluation, whose result is the last printed line:
``final: top1=<value> step=<n> ...``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import data, sharding, zoo
from lib.layers.conv import set_conv_impl
from lib.layers.norm import BatchNorm
from lib.train import checkpoint, distill as distill_lib, optim, schedules, step as step_lib

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The config cannot work; raised before anything is compiled."""


def _is_main() -> bool:
    return jax.process_index() == 0


def _print(*args):
    if _is_main():
        print(*args, flush=True)


def validate(config, workdir: Path):
    """Check what can be checked before any work; returns the mesh the run will use."""
    parent = Path(workdir).absolute().parent
    if not parent.is_dir():
        raise ConfigError(f"the parent of workdir does not exist: {parent}")
    try:
        mesh = sharding.make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data_size = mesh.shape.get("data", 1)
    if config.input.batch_size % data_size or config.input.batch_size % jax.process_count():
        raise ConfigError(f"input.batch_size={config.input.batch_size} must divide by the data-parallel size "
                          f"{data_size} and the process count {jax.process_count()}")
    accum = config.get("grad_accum_steps", 1)
    if config.input.batch_size % (accum * data_size):
        raise ConfigError(f"input.batch_size={config.input.batch_size} must divide into grad_accum_steps={accum} "
                          f"micro-batches that each divide by the data-parallel size {data_size}")
    if config.get("compute_dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}")
    if config.get("bn_stats", "global") not in ("global", "per_shard"):
        raise ConfigError(f"bn_stats must be 'global' or 'per_shard', got {config.bn_stats!r}")
    try:
        distill_lib.config_from(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logits_file = config.get("distill", {}).get("teacher_logits")
    if logits_file and not Path(logits_file).is_file():
        raise ConfigError(f"distill.teacher_logits={logits_file} is not a file")
    return mesh


def _provenance() -> dict[str, Any]:
    import flax
    import optax
    import orbax.checkpoint
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"git_commit": commit, "argv": sys.argv, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax": orbax.checkpoint.__version__,
            "devices": [d.device_kind for d in jax.devices()], "process_count": jax.process_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _init_from(model, path: str, num_classes: int, use_ema: bool = False):
    """Fine-tuning start: official PyTorch weights (``use_ema``: a training checkpoint's
    ``state_dict_ema``) or our own weights directory; a classifier of another size is
    re-initialised (and that is logged)."""
    report = zoo.load_pretrained(model, path, strict=False, use_ema=use_ema)
    if report is None:
        _print(f"init_from: loaded {path}")
        return
    head_only = all(k.startswith("head") for k in report.missing) and all(
        m.startswith("head") for m in report.mismatched) and not report.unexpected
    if not report.ok and not head_only:
        raise zoo.WeightConversionError(f"init_from={path} does not fit the model:\n{report.summary()}")
    if not report.ok:
        _print(f"init_from: loaded {len(report.loaded)} tensors from {path}; the classifier was re-initialised "
               f"for {num_classes} classes ({', '.join(report.missing)})")
    else:
        _print(f"init_from: loaded {len(report.loaded)} tensors from {path}")


def _tensorboard_writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        _print("tensorboard=True but tensorboardX is not installed (pip install '.[tensorboard]'); skipping it")
        return None
    return SummaryWriter(str(workdir / "tensorboard"))


def _save_best(directory: Path, model, step: int, top1: float) -> None:
    """Keep the best evaluated weights in ``directory`` (``zoo.save_weights`` format).

    Written beside the old copy first and swapped in only when complete, so a crash mid-write
    never loses the previous best.
    """
    import shutil
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists() and jax.process_index() == 0:
        shutil.rmtree(tmp)
    zoo.save_weights(model, tmp)
    if jax.process_index() == 0:
        (tmp / "best.json").write_text(json.dumps({"step": step, "top1": top1}))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        if old.exists():
            shutil.rmtree(old)


def _global_batch(batch, shardings):
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def evaluate(eval_step, params, rest, pipeline, batch_shardings) -> dict[str, float]:
    totals = None
    for batch in pipeline:
        out = eval_step(params, rest, _global_batch(batch, batch_shardings))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"top1": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count, "count": int(totals["count"])}


def run(config, workdir: str | Path) -> dict[str, float]:
    """Train (or only evaluate) as ``config`` says, in ``workdir``; returns the final metrics."""
    workdir = Path(workdir).absolute()
    mesh = validate(config, workdir)
    workdir.mkdir(exist_ok=True)
    if _is_main():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        (workdir / "provenance.json").write_text(json.dumps(_provenance(), indent=2))

    set_conv_impl(config.get("conv_impl", "auto"))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    per_process_batch = config.input.batch_size // jax.process_count()
    distill_cfg = distill_lib.config_from(config)
    train_source = None
    if distill_cfg is not None and config.distill.get("teacher_logits"):  # each example carries its teacher logits
        train_source = distill_lib.TeacherLogitsSource(
            data.make_source(config.input, config.input.get("train_split", "train")),
            np.load(config.distill.teacher_logits), num_classes=config.num_classes)
    train_data = data.make_pipeline(config.input, train=True, batch_size=per_process_batch, seed=config.seed,
                                    source=train_source)
    eval_data = data.make_pipeline(config.input, train=False, batch_size=per_process_batch, seed=config.seed)
    extra_evals = {}  # name -> pipeline: the final evaluation at other resolutions / crop fractions
    for image_size, crop_pct in config.get("final_evals", []):
        cfg = config.input.copy_and_resolve_references()
        cfg.image_size, cfg.crop_pct = int(image_size), float(crop_pct)
        extra_evals[f"{int(image_size)}_crop{float(crop_pct):g}"] = data.make_pipeline(
            cfg, train=False, batch_size=per_process_batch, seed=config.seed)
    steps_per_epoch = train_data.spec.steps_per_epoch

    model_kwargs = dict(config.model.get("kwargs", {}))
    if config.get("compute_dtype", "float32") == "bfloat16":
        model_kwargs["dtype"] = jnp.bfloat16
    model = zoo.create_model(config.model.name, num_classes=config.num_classes, rngs=config.seed, mesh=mesh,
                             sharding_rules=rules, **model_kwargs)
    if config.get("init_from"):
        _init_from(model, config.init_from, config.num_classes, use_ema=config.get("init_from_ema", False))
    if config.get("bn_stats", "global") == "per_shard":  # per-device statistics, as PyTorch DDP
        groups = mesh.shape.get("data", 1)
        for _, module in nnx.iter_graph(model):
            if isinstance(module, BatchNorm):
                module.batch_groups = groups

    total_epochs = config.total_epochs + config.get("cooldown_epochs", 0)
    total_steps = config.get("total_steps") or int(math.ceil(total_epochs * steps_per_epoch))
    schedule = schedules.make_schedule(
        lr=config.lr, min_lr=config.min_lr, epochs=config.total_epochs, steps_per_epoch=steps_per_epoch,
        warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr, per_epoch=config.schedule_per_epoch)
    tx = optim.make_optimizer(schedule, name=config.optimizer, weight_decay=config.wd,
                                 grad_clip=config.get("grad_clip"), momentum=config.get("momentum", 0.9))
    graphdef, state = step_lib.init_train_state(model, tx, ema=config.ema_decay > 0)
    state_shardings = step_lib.shardings_of(state)
    batch_shardings = {"image": sharding.batch_sharding(mesh, rules, 4), "label": sharding.batch_sharding(mesh, rules, 1),
                       "mask": sharding.batch_sharding(mesh, rules, 1)}
    teacher = None
    if train_source is not None:
        batch_shardings[distill_lib.TEACHER_LOGITS_KEY] = sharding.batch_sharding(mesh, rules, 2)
    elif distill_cfg is not None:
        teacher = distill_lib.load_teacher(config.distill.teacher, config.distill.get("teacher_weights"),
                                           num_classes=config.num_classes, mesh=mesh, sharding_rules=rules)
        _print(f"distilling from {config.distill.teacher} ({zoo.count_params(teacher):,} params), "
               f"alpha={distill_cfg.alpha} tau={distill_cfg.tau}")
    mixup = None
    if config.mixup.mixup_alpha > 0 or config.mixup.cutmix_alpha > 0:
        mixup_kwargs = dict(config.mixup)

        def mixup(key, images, labels, extra=None):
            return data.mixup_cutmix(key, images, labels, num_classes=config.num_classes,
                                     label_smoothing=config.label_smoothing, extra=extra, **mixup_kwargs)
    step_cfg = step_lib.StepConfig(num_classes=config.num_classes, label_smoothing=config.label_smoothing,
                                   ema_decay=config.ema_decay, grad_accum_steps=config.get("grad_accum_steps", 1),
                                   mixup=mixup, distill=distill_cfg)
    base_key = jax.random.key(config.seed)
    train_step = step_lib.make_train_step(graphdef, tx, step_cfg, base_key=base_key,
                                          state_shardings=state_shardings, batch_shardings=batch_shardings,
                                          teacher=teacher)
    eval_batch_shardings = {k: batch_shardings[k] for k in ("image", "label", "mask")}
    eval_step = step_lib.make_eval_step(graphdef, state_shardings=state_shardings, batch_shardings=eval_batch_shardings)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3))
    train_iter = iter(train_data)
    restored, restored_step = ckpt.restore_latest(state, train_iter)
    if restored is not None:
        state = restored
        _print(f"resumed from {ckpt.directory} at step {restored_step}")

    stop = {"signal": None}
    # Preemption (SIGTERM) saves and exits cleanly; signal handlers can only be set in the main thread.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum)) if in_main_thread else None
    metrics_file = open(workdir / "metrics.jsonl", "a") if _is_main() else None

    def write(row):
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    writer = _tensorboard_writer(workdir) if config.get("tensorboard") and _is_main() else None
    profile_start, profile_stop = config.get("profile_steps", (0, 0))
    best_top1 = -1.0
    step = int(state["step"])
    try:
        if not config.get("eval_only"):
            t0, seen, last_log = time.time(), 0, time.time()
            while step < total_steps:
                if profile_stop > profile_start and step == profile_start and _is_main():
                    jax.profiler.start_trace(str(workdir / "profile"))
                if profile_stop > profile_start and step == profile_stop and _is_main():
                    jax.profiler.stop_trace()
                batch = _global_batch(next(train_iter), batch_shardings)
                state, metrics = train_step(state, batch)
                step += 1
                seen += config.input.batch_size
                at_checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                if step % config.log_every == 0 or step == total_steps or at_checkpoint:
                    m = jax.device_get(metrics)
                    # Checked before any checkpoint of this step is written, so a saved state is finite.
                    bad = [k for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(m[k])]
                    if bad:
                        ckpt.wait()
                        raise FloatingPointError(
                            f"non-finite {', '.join(bad)} at step {step} (loss={m['loss']}); stopping. The last good "
                            f"checkpoints in {ckpt.directory} (steps {ckpt.manager.all_steps()}) are kept.")
                if step % config.log_every == 0 or step == total_steps:
                    now = time.time()
                    rate = seen / (now - last_log)
                    eta = (total_steps - step) * config.input.batch_size / max(rate, 1e-9)
                    row = {"step": step, "epoch": step / steps_per_epoch, "lr": float(schedule(step - 1)),
                           **{k: float(v) for k, v in m.items()}, "img_per_s": rate}
                    write(row)
                    if writer is not None:
                        for k, v in row.items():
                            writer.add_scalar(f"train/{k}", v, step)
                    _print(f"step {step}/{total_steps} loss={row['loss']:.4f} top1={row['top1']:.3f} "
                           f"lr={row['lr']:.2e} {rate:.0f} img/s ETA {eta / 60:.1f} min")
                    seen, last_log = 0, now
                if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                    ev = evaluate(eval_step, state["params"], state["rest"], eval_data, batch_shardings)
                    write({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
                    _print(f"step {step} val top1={ev['top1']:.4f} loss={ev['loss']:.4f}")
                    if ev["top1"] > best_top1:
                        best_top1 = ev["top1"]
                        _save_best(workdir / "best", nnx.merge(graphdef, state["params"], state["rest"]), step,
                                   ev["top1"])
                if at_checkpoint:
                    ckpt.save(step, state, train_iter)
                if stop["signal"] is not None:
                    ckpt.save(step, state, train_iter, force=True)
                    ckpt.wait()
                    _print(f"received signal {stop['signal']}: saved step {step} to {ckpt.directory}, exiting")
                    return {"preempted": True, "step": step}
            ckpt.save(step, state, train_iter, force=True)
            _print(f"training done in {(time.time() - t0) / 60:.1f} min")
        result = evaluate(eval_step, state["params"], state["rest"], eval_data, batch_shardings)
        if state["ema"] is not None:
            ema = evaluate(eval_step, state["ema"], state["rest"], eval_data, batch_shardings)
            result["ema_top1"] = ema["top1"]
        for name, pipeline in extra_evals.items():
            result[f"top1_{name}"] = evaluate(eval_step, state["params"], state["rest"], pipeline,
                                              batch_shardings)["top1"]
        result["step"] = step
        write({"final": True, "step": step, **{f"val_{k}": v for k, v in result.items() if k != "step"}})
    finally:
        if writer is not None:
            writer.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        if metrics_file:
            metrics_file.close()
    extras = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in result.items() if k not in ("top1", "step"))
    _print(f"final: top1={result['top1']:.4f} step={step} {extras}")  # the last line, for scripts
    return result
