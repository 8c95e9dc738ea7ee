"""The memory plan of the paper's MFT step, proven by ahead-of-time compilation on simulated devices:

    python -m projects.mft.memory                       # llama2_7b, 4 masked layers, 8 devices, FSDP
    python -m projects.mft.memory --model llama3_8b --mesh fsdp_tp --seq 4096 --batch 8

The MFT train step of ``configs/mft/llama2_7b.py`` (bfloat16 weights frozen, float32 scores and
their AdamW moments for the seven projections of 4 layers, sequence 4096, remat per layer) is
lowered and compiled for a mesh of simulated CPU devices; XLA's memory analysis gives the bytes
per device (arguments: frozen weights + scores + moments + batch; temporaries: activations).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2_7b")
    p.add_argument("--layers", default="20-23", help="masked layers a-b (coding: 20-23)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mesh", default="fsdp", choices=["fsdp", "fsdp_tp"])
    p.add_argument("--batch", type=int, default=8, help="global sequences per micro-step")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--remat", default="full")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    jax.config.update("jax_num_cpu_devices", args.devices)   # before JAX starts its backend
    print(json.dumps(plan(args.model, args.layers, devices=args.devices, mesh_kind=args.mesh, batch=args.batch,
                          seq=args.seq, remat=args.remat)))
    return 0


def plan(model_name: str, layers: str, *, devices: int = 8, mesh_kind: str = "fsdp", batch: int = 8,
         seq: int = 4096, remat: str = "full") -> dict:
    """Compile the MFT step of ``model_name`` (masked ``layers`` "a-b") for ``devices`` simulated
    devices and return its memory per device (GiB) and the counts of scores and frozen values."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lib import sharding, zoo
    from lib.data import text
    from lib.models import llama
    from lib.train import aot, optim, step as step_lib
    from projects.mft.task import MaskFineTuning, MaskSettings

    first, last = (int(x) for x in layers.split("-"))
    task = MaskFineTuning(MaskSettings(layers=tuple(range(first, last + 1))))
    axes = (("data", devices),) if mesh_kind == "fsdp" else (("data", devices // 2), ("model", 2))
    mesh = sharding.make_mesh(axes, devices=jax.devices()[:devices])
    rules = llama.RULES[mesh_kind]
    t0 = time.perf_counter()
    model = aot.on_mesh(nnx.eval_shape(lambda: task.wrap(
        zoo.create_model(model_name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=remat), nnx.Rngs(0))),
        mesh, rules)
    tx = optim.make_optimizer(lambda s: 2e-5, weight_decay=0.0, grad_clip=1.0)
    graphdef, state, frozen = step_lib.abstract_train_state(model, tx, trainable=task.trainable)
    b_sh = sharding.batch_sharding(mesh, rules, ndim=2)
    inputs = text.abstract_batch(batch, seq, b_sh)
    fn = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, base_key=jax.random.key(0),
                                  state_shardings=step_lib.shardings_of(state),
                                  batch_shardings={k: b_sh for k in inputs})
    t1 = time.perf_counter()
    compiled = fn.lower(state, inputs).compile()
    t2 = time.perf_counter()
    held = {"scores": aot.bytes_per_device(state["params"]), "adam_moments": aot.bytes_per_device(state["opt"]),
            "frozen": aot.bytes_per_device(frozen)}
    return {"model": model_name, "masked_layers": layers, "mesh": dict(axes), "rules": mesh_kind,
            "batch": batch, "seq": seq, "remat": remat,
            "scores": sum(x.size for x in jax.tree.leaves(state["params"])),
            "frozen_values": sum(x.size for x in jax.tree.leaves(frozen)),
            **{f"{k}_gib_per_device": round(v / aot.GIB, 3) for k, v in held.items()},
            "bytes_per_device": held, **aot.memory_report(compiled),
            "setup_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1), "jax": jax.__version__}

if __name__ == "__main__":
    sys.exit(main())
