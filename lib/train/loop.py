"""The one generic training loop: config in, trained and evaluated model out.

    from lib.train import loop
    result = loop.run(config, workdir)     # also: python -m projects.<paper>.train --config ... --workdir ...

Flow (one function each): :func:`setup` (validate the config; mesh; the task from ``config.task``;
data pipelines; the model created sharded, ``init_from``, wrapped by the task; the state split into
trained / frozen / mutable; optimizer; jitted steps; restore the latest checkpoint) -> :func:`train`
(steps with periodic eval, best weights and checkpoints) -> :func:`final_evaluation`, whose result
is the last printed line: ``final: <the task's best metric>=<value> step=<n> ...`` (classification:
``final: top1=...``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
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

from lib import data, sharding, tasks, zoo
from lib.layers.conv import set_conv_impl
from lib.layers.norm import BatchNorm
from lib.train import checkpoint, optim, schedules, step as step_lib
from lib.train.task import Task

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
    if config.get("lr_schedule", "cosine") not in schedules.SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {config.lr_schedule!r}; expected one of {schedules.SCHEDULES}")
    if config.get("bn_stats", "global") not in ("global", "per_shard"):
        raise ConfigError(f"bn_stats must be 'global' or 'per_shard', got {config.bn_stats!r}")
    try:
        data.pipeline.validate_config(config.input, batch_size=config.input.batch_size // jax.process_count())
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
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


def _init_from(model, path: str, reinit: str, use_ema: bool = False):
    """Fine-tuning start: official PyTorch weights (``use_ema``: a training checkpoint's
    ``state_dict_ema``) or our own weights directory. Keys matching the regex ``reinit`` (the
    classifier, for another number of classes) may be missing or mis-shaped: they keep their fresh
    initial values, and that is logged; any other difference is an error."""
    report = zoo.load_pretrained(model, path, strict=False, use_ema=use_ema)
    if report is None:
        _print(f"init_from: loaded {path}")
        return
    pattern = re.compile(reinit) if reinit else None
    allowed = pattern is not None and all(pattern.search(k) for k in report.missing) and all(
        pattern.search(m) for m in report.mismatched) and not report.unexpected
    if not report.ok and not allowed:
        raise zoo.WeightConversionError(f"init_from={path} does not fit the model:\n{report.summary()}")
    if not report.ok:
        kept = sorted(set(report.missing) | {m.split()[0] for m in report.mismatched})
        _print(f"init_from: loaded {len(report.loaded)} tensors from {path}; kept the fresh initial values of "
               f"{', '.join(kept)} (init_from_reinit={reinit!r})")
    else:
        _print(f"init_from: loaded {len(report.loaded)} tensors from {path}")


def _tensorboard_writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        _print("tensorboard=True but tensorboardX is not installed (pip install '.[tensorboard]'); skipping it")
        return None
    return SummaryWriter(str(workdir / "tensorboard"))


def _save_best(directory: Path, model, step: int, metrics: dict[str, float]) -> None:
    """Keep the best evaluated weights in ``directory`` (``zoo.save_weights`` format).

    Written beside the old copy first and swapped in only when complete, so a crash mid-write
    never loses the previous best.
    """
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists() and jax.process_index() == 0:
        shutil.rmtree(tmp)
    zoo.save_weights(model, tmp)
    if jax.process_index() == 0:
        (tmp / "best.json").write_text(json.dumps({"step": step, **metrics}))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        if old.exists():
            shutil.rmtree(old)


def _global_batch(batch, mesh, rules):
    """A process-local numpy batch (any keys) as global arrays, each sharded over its leading axis."""
    shardings = sharding.batch_shardings(mesh, rules, batch)
    return jax.tree.map(lambda v, s: jax.make_array_from_process_local_data(s, np.asarray(v)), batch, shardings)


def evaluate(eval_step, params, rest, pipeline, mesh, rules) -> dict[str, float]:
    """Every metric of the task over one pass of ``pipeline``: sums and counts added over batches,
    then divided (padded rows have weight 0). ``count`` is the number of real examples."""
    totals = None
    for batch in pipeline:
        out = eval_step(params, rest, _global_batch(batch, mesh, rules))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    result = {name: float(total) / max(float(count), 1e-12) for name, (total, count) in totals.items()}
    result["count"] = int(max(float(count) for _, count in totals.values()))
    if getattr(eval_step, "task", None) is not None:
        result.update(eval_step.task.derived(result))
    return result


@dataclasses.dataclass
class Run:
    """Everything :func:`setup` builds for :func:`train` and :func:`final_evaluation`."""
    config: Any
    workdir: Path
    mesh: Any
    rules: tuple
    task: Task
    graphdef: Any
    state: dict
    train_step: step_lib.TrainStep
    eval_step: step_lib.EvalStep
    schedule: Any
    total_steps: int
    steps_per_epoch: int
    train_data: Any
    eval_data: Any
    extra_evals: dict
    checkpointer: checkpoint.Checkpointer
    train_iter: Any

    def model(self, params=None) -> nnx.Module:
        """The trained model (``params``: e.g. the EMA instead), without the task's wrapping."""
        state = self.state
        params = state["params"] if params is None else params
        return self.task.unwrap(nnx.merge(self.graphdef, params, self.train_step.frozen, state["rest"]))


def _pipelines(config, task, per_process_batch: int):
    def pipeline(cfg, train: bool):
        source = task.wrap_source(data.make_source(cfg, data.pipeline.split_of(cfg, train=train)), train=train)
        return data.make_pipeline(cfg, train=train, batch_size=per_process_batch, seed=config.seed, source=source)

    extra_evals = {}  # name -> pipeline: the final evaluation at other resolutions / crop fractions
    for image_size, crop_pct in config.get("final_evals", []):
        cfg = config.input.copy_and_resolve_references()
        cfg.image_size, cfg.crop_pct = int(image_size), float(crop_pct)
        extra_evals[f"{int(image_size)}_crop{float(crop_pct):g}"] = pipeline(cfg, train=False)
    return pipeline(config.input, train=True), pipeline(config.input, train=False), extra_evals


def _model_kwargs(config, task) -> dict:
    kwargs = {**task.model_kwargs(), **dict(config.model.get("kwargs", {}))}
    if config.get("compute_dtype", "float32") == "bfloat16":
        kwargs["dtype"] = jnp.bfloat16
    return kwargs


def _wrap_rngs(config) -> nnx.Rngs:
    return nnx.Rngs(jax.random.fold_in(jax.random.key(config.seed), 7))


def _trainable(config, task):
    """The trainable filter, checked on the abstract (wrapped) model: a filter that matches nothing
    is a :class:`ConfigError` before anything is written or compiled."""
    trainable = step_lib.trainable_filter(task.trainable, tuple(config.get("trainable", ())))
    kwargs = _model_kwargs(config, task)
    try:   # built and wrapped inside one trace (a wrap may restructure the model: MFT splits its layer stack)
        wrapped = nnx.eval_shape(lambda: task.wrap(zoo.create_model(config.model.name, rngs=config.seed, **kwargs),
                                                   _wrap_rngs(config)))
    except ValueError as e:   # the task's settings do not fit this model (e.g. layers out of range)
        raise ConfigError(f"task {config.get('task', 'classification')!r} on {config.model.name}: {e}") from None
    try:
        step_lib.split_model(wrapped, trainable)
    except step_lib.NothingTrainable as e:
        raise ConfigError(f"trainable={list(config.get('trainable', ()))}: {e}") from None
    return trainable


def _create_model(config, task, mesh, rules) -> nnx.Module:
    """The model as the config builds it (zoo, ``init_from``, per-shard BatchNorm), wrapped by the task."""
    model_kwargs = _model_kwargs(config, task)
    model = zoo.create_model(config.model.name, rngs=config.seed, mesh=mesh, sharding_rules=rules, **model_kwargs)
    if config.get("init_from"):
        try:
            _init_from(model, config.init_from, config.get("init_from_reinit", ""),
                       use_ema=config.get("init_from_ema", False))
        except (zoo.WeightConversionError, FileNotFoundError) as e:
            raise ConfigError(str(e) if str(config.init_from) in str(e) else f"init_from={config.init_from}: {e}") from None
    if config.get("bn_stats", "global") == "per_shard":  # per-device statistics, as PyTorch DDP
        groups = mesh.shape.get("data", 1)
        for _, module in nnx.iter_graph(model):
            if isinstance(module, BatchNorm):
                module.batch_groups = groups
    wrapped = task.wrap(model, _wrap_rngs(config))
    # The task's own modules (heads, masks' scores) join the model on the mesh; placed arrays stay put.
    nnx.update(wrapped, sharding.place(nnx.state(wrapped), mesh, rules))
    return wrapped


def setup(config, workdir: str | Path) -> Run:
    """Validate, then build the mesh, task, data, model, optimizer, jitted steps and checkpointer,
    and restore the latest checkpoint of ``workdir`` if there is one."""
    workdir = Path(workdir).absolute()
    mesh = validate(config, workdir)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    try:
        task = tasks.from_config(config, mesh=mesh, sharding_rules=rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    trainable = _trainable(config, task)
    workdir.mkdir(exist_ok=True)
    if _is_main():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        (workdir / "provenance.json").write_text(json.dumps(_provenance(), indent=2))
    set_conv_impl(config.get("conv_impl", "auto"))
    if task.constants() is not None:
        _print(f"task {type(task).__name__}: constants of {sum(x.size for x in jax.tree.leaves(task.constants())):,} "
               f"values (e.g. a teacher)")
    train_data, eval_data, extra_evals = _pipelines(config, task, config.input.batch_size // jax.process_count())
    steps_per_epoch = train_data.spec.steps_per_epoch
    model = _create_model(config, task, mesh, rules)

    total_epochs = config.total_epochs + config.get("cooldown_epochs", 0)
    total_steps = config.get("total_steps") or int(math.ceil(total_epochs * steps_per_epoch))
    schedule = schedules.make_schedule(
        lr=config.lr, min_lr=config.min_lr, epochs=config.total_epochs, steps_per_epoch=steps_per_epoch,
        warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr, per_epoch=config.schedule_per_epoch,
        kind=config.get("lr_schedule", "cosine"), warmup_ratio=config.get("warmup_ratio", 0.0),
        total_steps=total_steps)
    tx = optim.make_optimizer(schedule, name=config.optimizer, weight_decay=config.wd,
                              grad_clip=config.get("grad_clip"), momentum=config.get("momentum", 0.9),
                              decay_1d_params=config.get("decay_1d_params", False))
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=config.ema_decay > 0, trainable=trainable)
    if jax.tree.leaves(frozen):
        n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
        n_trained = sum(x.size for x in jax.tree.leaves(state["params"]))
        _print(f"training {n_trained:,} values ({100 * n_trained / (n_trained + n_frozen):.3g}%); "
               f"{n_frozen:,} frozen")
    state_shardings = step_lib.shardings_of(state)
    options = step_lib.StepOptions(ema_decay=config.ema_decay, grad_accum_steps=config.get("grad_accum_steps", 1))
    consts = sharding.place(task.constants(), mesh, rules)
    train_step = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, consts=consts,
                                          base_key=jax.random.key(config.seed), options=options, trainable=trainable,
                                          state_shardings=state_shardings)
    eval_step = step_lib.make_eval_step(graphdef, task, frozen=frozen, consts=consts)

    origin = {"model": config.model.name, "seed": config.seed, "init_from": config.get("init_from"),
              "trainable": list(config.get("trainable", ()))}
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3),
                                   frozen=frozen, origin=origin)
    train_iter = iter(train_data)
    restored, restored_step = ckpt.restore_latest(state, train_iter)
    if restored is not None:
        state = restored
        _print(f"resumed from {ckpt.directory} at step {restored_step}")
    return Run(config, workdir, mesh, rules, task, graphdef, state, train_step, eval_step, schedule, total_steps,
               steps_per_epoch, train_data, eval_data, extra_evals, ckpt, train_iter)


class _MetricsLog:
    """metrics.jsonl (and TensorBoard) on process 0."""

    def __init__(self, run: Run):
        self.file = open(run.workdir / "metrics.jsonl", "a") if _is_main() else None
        self.writer = _tensorboard_writer(run.workdir) if run.config.get("tensorboard") and _is_main() else None

    def write(self, row: dict, prefix: str | None = None):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.writer is not None and prefix:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, row["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.file:
            self.file.close()


_STEP_STATS = ("grad_norm", "param_norm")


def train(run: Run, log: _MetricsLog) -> bool:
    """Train to ``run.total_steps`` with periodic eval, best weights and checkpoints; returns False
    when a SIGTERM (preemption) stopped it after saving."""
    config, ckpt = run.config, run.checkpointer
    metric, _ = run.task.best
    stop = {"signal": None}
    # Preemption (SIGTERM) saves and exits cleanly; signal handlers can only be set in the main thread.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum)) if in_main_thread else None
    profile_start, profile_stop = config.get("profile_steps", (0, 0))
    best = None
    step = int(run.state["step"])
    t0, seen, last_log = time.time(), 0, time.time()
    try:
        while step < run.total_steps:
            if profile_stop > profile_start and step == profile_start and _is_main():
                jax.profiler.start_trace(str(run.workdir / "profile"))
            if profile_stop > profile_start and step == profile_stop and _is_main():
                jax.profiler.stop_trace()
            batch = _global_batch(next(run.train_iter), run.mesh, run.rules)
            run.state, metrics = run.train_step(run.state, batch)
            step += 1
            seen += config.input.batch_size
            at_checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            if step % config.log_every == 0 or step == run.total_steps or at_checkpoint:
                m = jax.device_get(metrics)
                # Checked before any checkpoint of this step is written, so a saved state is finite.
                bad = [k for k in ("loss", *_STEP_STATS) if not np.isfinite(m[k])]
                if bad:
                    ckpt.wait()
                    raise FloatingPointError(
                        f"non-finite {', '.join(bad)} at step {step} (loss={m['loss']}); stopping. The last good "
                        f"checkpoints in {ckpt.directory} (steps {ckpt.manager.all_steps()}) are kept.")
            if step % config.log_every == 0 or step == run.total_steps:
                now = time.time()
                rate = seen / (now - last_log)
                eta = (run.total_steps - step) * config.input.batch_size / max(rate, 1e-9)
                row = {"step": step, "epoch": step / run.steps_per_epoch, "lr": float(run.schedule(step - 1)),
                       **{k: float(v) for k, v in m.items()}, "examples_per_s": rate}
                log.write(row, "train")
                shown = " ".join(f"{k}={v:.3f}" for k, v in m.items() if k not in ("loss", *_STEP_STATS))
                _print(f"step {step}/{run.total_steps} loss={row['loss']:.4f} {shown} lr={row['lr']:.2e} "
                       f"{rate:.0f} ex/s ETA {eta / 60:.1f} min")
                seen, last_log = 0, now
            if config.eval_every and step % config.eval_every == 0 and step < run.total_steps:
                ev = evaluate(run.eval_step, run.state["params"], run.state["rest"], run.eval_data, run.mesh, run.rules)
                candidate, params = ev, None
                if run.state["ema"] is not None:  # as timm: with an EMA, best/ is the EMA chosen on its own metric
                    candidate = evaluate(run.eval_step, run.state["ema"], run.state["rest"], run.eval_data, run.mesh,
                                         run.rules)
                    params = run.state["ema"]
                    ev.update({f"ema_{k}": v for k, v in candidate.items() if k != "count"})
                log.write({"step": step, **{f"val_{k}": v for k, v in ev.items()}}, "val")
                _print(f"step {step} val " + " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k != "count"))
                if run.task.is_better(candidate[metric], best):
                    best = candidate[metric]
                    _save_best(run.workdir / "best", run.model(params), step,
                               {metric: best, "weights": "ema" if params is not None else "params"})
            if at_checkpoint:
                ckpt.save(step, run.state, run.train_iter)
            if stop["signal"] is not None:
                ckpt.save(step, run.state, run.train_iter, force=True)
                ckpt.wait()
                _print(f"received signal {stop['signal']}: saved step {step} to {ckpt.directory}, exiting")
                return False
        ckpt.save(step, run.state, run.train_iter, force=True)
        _print(f"training done in {(time.time() - t0) / 60:.1f} min")
        return True
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def final_evaluation(run: Run) -> dict[str, float]:
    """The task's metrics on the eval split (and of the EMA, and at the ``final_evals`` settings)."""
    metric, _ = run.task.best
    state = run.state
    result = evaluate(run.eval_step, state["params"], state["rest"], run.eval_data, run.mesh, run.rules)
    if state["ema"] is not None:
        ema = evaluate(run.eval_step, state["ema"], state["rest"], run.eval_data, run.mesh, run.rules)
        result[f"ema_{metric}"] = ema[metric]
    for name, pipeline in run.extra_evals.items():
        result[f"{metric}_{name}"] = evaluate(run.eval_step, state["params"], state["rest"], pipeline, run.mesh,
                                              run.rules)[metric]
    result["step"] = int(state["step"])
    return result


def run(config, workdir: str | Path) -> dict[str, float]:
    """Train (or only evaluate) as ``config`` says, in ``workdir``; returns the final metrics.

    The last line printed is ``final: <best metric>=<value> step=<n> <other metrics>``.
    """
    r = setup(config, workdir)
    log = _MetricsLog(r)
    try:
        if not config.get("eval_only") and not train(r, log):
            return {"preempted": True, "step": int(r.state["step"])}
        result = final_evaluation(r)
        log.write({"final": True, "step": result["step"],
                   **{f"val_{k}": v for k, v in result.items() if k != "step"}})
    finally:
        r.checkpointer.close()
        log.close()
    metric = r.task.best[0]
    extras = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in result.items() if k not in (metric, "step"))
    _print(f"final: {metric}={result[metric]:.4f} step={result['step']} {extras}")  # the last line, for scripts
    return result
