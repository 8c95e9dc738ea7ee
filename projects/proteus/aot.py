"""Ahead-of-time compile of a Proteus train step on a simulated FSDP mesh; XLA's per-device memory.

    python -m projects.proteus.aot --student l --devices 8 --batch 1024      # ViT-L/14 from DINOv2-g/14

Nothing is allocated: the teacher, the wrapped student, the AdamW moments and the EMA are
``jax.ShapeDtypeStruct`` leaves carrying the shardings the rules give them, and the step is lowered
and compiled for ``--devices`` simulated CPU devices (``jax_num_cpu_devices``). The FSDP rules
split every kernel's ``out_channels`` / ``heads`` / ``mlp`` axis and the batch over ``data``. The
printout is ``compiled.memory_analysis()`` (per device: arguments, outputs, temporaries, the peak
estimate where this jax reports one) and the parameter counts. XLA:CPU's buffer assignment is
not a GPU's, but argument sizes are exact and temporaries are the same order.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="l", help="ti | s | b | l (the paper's pairs, configs/proteus/imagenet.py)")
    p.add_argument("--teacher", default="", help="another teacher zoo name")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024, help="global batch")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--remat", action="store_true", help="recompute the student's blocks in the backward pass")
    p.add_argument("--teacher-dtype", default="bfloat16")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", default="", help="also write the numbers here")
    a = p.parse_args(argv)

    import jax
    jax.config.update("jax_num_cpu_devices", a.devices)
    import jax.numpy as jnp
    from flax import nnx

    from configs.proteus import imagenet
    from lib import sharding, zoo
    from lib.tasks import proteus
    from lib.train import aot, optim, schedules, step as step_lib

    c = imagenet.get_config(f"student={a.student},batch_size={a.batch}" + (f",teacher={a.teacher}" if a.teacher else ""))
    mesh = sharding.make_mesh([("data", a.devices)])
    rules = (("batch", "data"), ("out_channels", "data"), ("heads", "data"), ("mlp", "data"), ("classes", "data"))

    teacher = proteus.load_teacher(c.proteus.teacher, dtype=a.teacher_dtype, mesh=mesh, sharding_rules=rules,
                                   abstract=True)
    task = proteus.Proteus(teacher, proteus.settings_from(c), mesh=mesh, sharding_rules=rules)
    student = zoo.create_model(c.model.name, abstract=True, img_size=a.image_size, remat=a.remat)
    wrapped = aot.on_mesh(nnx.eval_shape(lambda: task.wrap(student, nnx.Rngs(0))), mesh, rules)

    steps_per_epoch = 1_281_167 // a.batch
    schedule = schedules.make_schedule(lr=c.lr, min_lr=c.min_lr, epochs=c.total_epochs, steps_per_epoch=steps_per_epoch,
                                       warmup_epochs=c.warmup_epochs, warmup_lr=c.warmup_lr, per_epoch=True)
    tx = optim.make_optimizer(schedule, name=c.optimizer, weight_decay=c.wd)
    graphdef, state, frozen = step_lib.abstract_train_state(wrapped, tx, ema=not a.no_ema, trainable=task.trainable)
    params = state["params"]
    batch = {"image": jax.ShapeDtypeStruct((a.batch, a.image_size, a.image_size, 3), jnp.float32,
                                           sharding=sharding.batch_sharding(mesh, rules))}
    consts = task.constants()
    train_step = step_lib.make_train_step(
        graphdef, tx, task, frozen=frozen, consts=consts, base_key=jax.random.key(0),
        options=step_lib.StepOptions(ema_decay=0.0 if a.no_ema else c.ema_decay), trainable=task.trainable,
        state_shardings=step_lib.shardings_of(state), batch_shardings=step_lib.shardings_of(batch))
    t0 = time.time()
    lowered = train_step.lower(state, batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    n_teacher = sum(x.size for x in jax.tree.leaves(consts))
    n_student = sum(x.size for x in jax.tree.leaves(params))
    result = {
        "student": c.model.name, "teacher": c.proteus.teacher, "teacher_dtype": a.teacher_dtype, "devices": a.devices,
        "global_batch": a.batch, "image_size": a.image_size, "remat": a.remat, "ema": not a.no_ema,
        "teacher_params": int(n_teacher), "trained_params": int(n_student),
        "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1), **aot.memory_report(compiled),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
