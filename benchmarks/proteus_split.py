"""Where a Proteus train step's time goes: the teacher's forward and the student's passes, one JSON line each.

    python -m benchmarks.proteus_split                        # ViT-Ti/14 student from a ViT-S/14 teacher, 224, batch 32
    python -m benchmarks.proteus_split --student dinov2_vits14 --teacher dinov2_vitb14 --teacher-dtype float32,bfloat16
    python -m benchmarks.proteus_split --student dinov2_tiny --teacher dinov2_tiny --resolution 56 --batch-size 2

Every part is timed with the loop of ``benchmarks/throughput.py`` (``machine.time_calls``: ``--warmup``
untimed calls, then ``--steps`` timed ones, each ended by ``jax.block_until_ready``) and gives one row:

* ``step``: the trainer's train step, ``lib.train.step.make_train_step`` with the task
  ``lib.tasks.proteus.Proteus`` (the teacher, in eval mode, is the task's constants): the teacher's
  forward on the B images, the masks, the student's forward on the 2B batch [masked; unmasked] with
  its three heads, the backward pass, AdamW and the EMA, state donated;
* ``teacher``: the teacher's forward alone, ``jax.jit(task.teacher_tokens)`` on the same images;
* ``student_step``: the same train step with the teacher's tokens given (computed once beforehand and
  passed as the step's constants): ``step`` without the teacher;
* ``student_grad``: ``jax.value_and_grad`` of the Proteus loss with the teacher's tokens given: the
  student's forward and backward on the 2B batch, no optimizer, no EMA.

``share_of_step`` is a part's median time over the step's; a last summary line gives every part's
median and share and ``unaccounted_ms`` = step - teacher - student_step (what the parts do not
explain: scheduling across the two halves, a teacher that is cheaper or dearer inside the step).

Settings as ``configs/proteus/imagenet.py`` runs them: the student built at the crop size
(``img_size=R``), the teacher as ``proteus.load_teacher`` builds it (the zoo's ``img_size``, 518 for
the hub ViTs, so its position embedding is interpolated to the crop's grid in every call, as with the
official checkpoints; ``--teacher-img-size R`` builds it at the crop size instead), masks of the
first half of the batch, 50% of their patches, AdamW (lr 5e-4 x batch / 512, weight decay 0.05 on
>= 2-D parameters), EMA 0.99996 (``--ema-decay 0``: none). The recipe's teacher runs in bfloat16;
``--teacher-dtype`` (default float32, several allowed) chooses. Weights are random (speed does not
depend on them). Threads and host malloc as ``benchmarks/throughput.py``; one device.
"""
from __future__ import annotations

import argparse
import itertools

from benchmarks import machine, throughput
from benchmarks.throughput import _conv_impl_context, _conv_impl_name, _emit, _setup_process, _split

PARTS = ("step", "teacher", "student_step", "student_grad")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="dinov2_vitti14", help="zoo ViT trained (default dinov2_vitti14)")
    p.add_argument("--teacher", default="dinov2_vits14", help="zoo ViT distilled (default dinov2_vits14)")
    p.add_argument("--batch-size", action="append", help="batch size(s) B (default 32; the student sees 2B)")
    p.add_argument("--resolution", action="append", help="crop side(s) (default 224)")
    p.add_argument("--teacher-dtype", action="append", help="float32 and/or bfloat16 (default float32; the "
                   "recipe's is bfloat16): the teacher's parameters and compute")
    p.add_argument("--dtype", action="append", help="the student's compute dtype(s), float32 and/or bfloat16 "
                   "(params stay float32; default float32)")
    p.add_argument("--teacher-img-size", type=int, default=None, help="build the teacher for this input size "
                   "(default: the zoo's, as the trainer does; 518 for the hub ViTs)")
    p.add_argument("--ema-decay", type=float, default=0.99996, help="EMA of the student (0: none)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)} to time")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
    p.add_argument("--steps", type=int, default=10, help="timed calls")
    p.add_argument("--threads", type=int, default=None, help="cores (pins the process to the first N); "
                   "default all schedulable cores")
    p.add_argument("--conv-impl", default=None, help="lib.layers.conv implementation (auto, xla, fast)")
    p.add_argument("--host-malloc", choices=("retain", "default"), default="retain",
                   help="retain (default, as the training CLI): lib.host_malloc.retain_freed_memory()")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batch_size = _split(args.batch_size, int) or [32]
    args.resolution = _split(args.resolution, int) or [224]
    args.teacher_dtype = _split(args.teacher_dtype) or ["float32"]
    args.dtype = _split(args.dtype) or ["float32"]
    args.parts = _split([args.parts])
    for d in args.teacher_dtype + args.dtype:
        if d not in ("float32", "bfloat16"):
            p.error(f"dtypes must be float32 or bfloat16, got {d!r}")
    for part in args.parts:
        if part not in PARTS:
            p.error(f"--parts: {part!r} is not one of {','.join(PARTS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1, --warmup >= 0")
    args.devices, args.profile = 1, 0     # for throughput._setup_process / throughput.measure
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    _setup_process(args)          # before anything below initialises JAX
    rows: list[dict] = []
    with _conv_impl_context(args.conv_impl):
        for batch, res, tdtype, dtype in itertools.product(args.batch_size, args.resolution, args.teacher_dtype,
                                                           args.dtype):
            run_split(batch, res, tdtype, dtype, args, rows)
    return rows


def _given_tokens_task(task, tokens):
    """The same Proteus task with the teacher's tokens given: its constants are ``(t_cls, t_patch)``."""
    from lib.tasks import proteus

    class GivenTeacherTokens(proteus.Proteus):
        def __init__(self):   # the settings, sizes and shardings of ``task``; no teacher
            self.__dict__.update(task.__dict__)

        def constants(self):
            return tokens

        def teacher_tokens(self, images, consts):
            return consts

    return GivenTeacherTokens()


def run_split(batch: int, res: int, teacher_dtype: str, dtype: str, args, rows: list[dict]) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lib import zoo
    from lib.tasks import proteus
    from lib.train import optim, step as step_lib
    from lib.train.task import mean_of

    teacher_kw = {} if args.teacher_img_size is None else {"img_size": args.teacher_img_size}
    teacher = proteus.load_teacher(args.teacher, None, dtype=teacher_dtype, kwargs=teacher_kw)
    task = proteus.Proteus(teacher, proteus.ProteusSettings())
    student_kw = {"img_size": res, **({"dtype": jnp.bfloat16} if dtype == "bfloat16" else {})}
    student = zoo.create_model(args.student, rngs=args.seed, **student_kw)
    model = task.wrap(student, nnx.Rngs(jax.random.fold_in(jax.random.key(args.seed), 7)))
    base = {"framework": "jax", "benchmark": "proteus_split", "model": args.student, "teacher": args.teacher,
            "batch": batch, "resolution": res, "dtype": dtype, "teacher_dtype": teacher_dtype,
            "student_img_size": res, "teacher_img_size": teacher.img_size, "ema_decay": args.ema_decay,
            "num_params": zoo.count_params(model), "teacher_num_params": zoo.count_params(teacher),
            "devices": 1, "threads": args.threads, "host_malloc": args.host_malloc,
            "host_malloc_applied": args.host_malloc_applied, "conv_impl": _conv_impl_name()}
    del teacher, student

    model.train()
    tx = optim.make_optimizer(lambda s: 5e-4 * batch / 512, weight_decay=0.05)
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=args.ema_decay > 0)
    del model
    options = step_lib.StepOptions(ema_decay=args.ema_decay)
    key = jax.random.key(args.seed)
    rng = np.random.default_rng(args.seed)
    images = jax.device_put(rng.standard_normal((batch, res, res, 3), dtype=np.float32))
    batch_tree = {"image": images}
    box = [state]          # the train state, donated by each step and threaded through every part
    del state
    medians: dict[str, float] = {}

    def emit(part, compiled, call, compile_s, train_step=False):
        row = {**base, "part": part}
        out = throughput.measure(row, compiled, call, compile_s, batch, args)
        medians[part] = row["median_step_ms"]
        row["share_of_step"] = round(row["median_step_ms"] / medians["step"], 4) if "step" in medians else None
        if train_step:
            row["final_loss"] = throughput.final_loss(out[1])
        _emit(row, rows)
        return out

    def time_train_step(part, task_):
        fn = step_lib.make_train_step(graphdef, tx, task_, frozen=frozen, base_key=key, options=options,
                                      donate=True)
        compiled, compile_s = machine.compile_timed(fn, box[0], batch_tree)

        def call():
            box[0], metrics = compiled(box[0], fn.frozen, batch_tree, fn.consts)
            return box[0], metrics
        emit(part, compiled, call, compile_s, train_step=True)

    if "step" in args.parts:
        time_train_step("step", task)

    teacher_fn = jax.jit(task.teacher_tokens)
    compiled, compile_s = machine.compile_timed(teacher_fn, images, task.constants())
    if "teacher" in args.parts:
        tokens = emit("teacher", compiled, lambda: compiled(images, task.constants()), compile_s)
    else:
        tokens = jax.block_until_ready(compiled(images, task.constants()))
    del compiled
    given = _given_tokens_task(task, tokens)

    if "student_step" in args.parts:
        time_train_step("student_step", given)

    if "student_grad" in args.parts:
        def grad(params, frozen, rest, batch, consts):
            def loss_fn(p):
                model = nnx.merge(graphdef, p, frozen, rest, copy=True)
                loss, _ = given.loss(model, batch, key, consts)
                return mean_of(loss)
            return jax.value_and_grad(loss_fn)(params)

        args_ = (box[0]["params"], frozen, box[0]["rest"], batch_tree, tokens)
        compiled, compile_s = machine.compile_timed(jax.jit(grad), *args_)
        emit("student_grad", compiled, lambda: compiled(*args_), compile_s)

    summary = {"summary": "proteus_split", **{k: base[k] for k in ("model", "teacher", "batch", "resolution",
                                                                  "dtype", "teacher_dtype")}}
    for part, ms in medians.items():
        summary[f"{part}_ms"] = ms
        summary[f"{part}_share"] = round(ms / medians["step"], 4) if "step" in medians else None
    if {"step", "teacher", "student_step"} <= medians.keys():
        summary["unaccounted_ms"] = round(medians["step"] - medians["teacher"] - medians["student_step"], 2)
    _emit(summary, rows)


if __name__ == "__main__":
    main()
