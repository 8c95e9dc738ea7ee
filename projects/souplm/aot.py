"""Ahead-of-time compile of the learnable-soup train step at the paper's scale; XLA's per-device memory.

    python -m projects.souplm.aot --granularity module --devices 8 --batch 8 --seq 2048

K frozen 7B experts (``vicuna_7b``: Vicuna-7B-v1.5 and LLaVA-1.5-7B's language model share its
shapes and tokenizer) in bfloat16, stacked on the ``expert`` axis and sharded FSDP-style
(``embed`` over ``data``; the expert axis replicated unless ``--expert-axis``), the alpha logits and
their Adam moments in float32, on ``--devices`` simulated CPU devices. Nothing is allocated: every
leaf is a ``jax.ShapeDtypeStruct`` with the sharding the rules give it, and the generic train step
(``lib.train.step``, ``lib.soup.SoupTask`` around ``causal_lm``) is lowered and compiled.
XLA:CPU's buffer assignment is not a GPU's, but argument sizes are exact and temporaries are of the
same order.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vicuna_7b")
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--granularity", default="module")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--expert-axis", action="store_true", help="shard the expert axis over a mesh axis 'expert'")
    p.add_argument("--baseline", action="store_true",
                   help="instead: one bf16 model, same step, only its final norm trained (what the architecture alone needs)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)

    import jax
    jax.config.update("jax_num_cpu_devices", a.devices)
    import optax
    from flax import nnx

    from lib import sharding, soup, zoo
    from lib.data import text
    from lib.tasks.causal_lm import CausalLM
    from lib.train import aot, step as step_lib

    if a.expert_axis:
        mesh = sharding.make_mesh([("expert", a.experts), ("data", a.devices // a.experts)])
        rules = (("batch", "data"), ("embed", "data"), ("expert", "expert"))
    else:
        mesh = sharding.make_mesh([("data", a.devices)])
        rules = (("batch", "data"), ("embed", "data"))
    base = zoo.create_model(a.model, abstract=True, dtype="bfloat16", param_dtype="bfloat16", remat=a.remat)
    task = soup.SoupTask(CausalLM(z_loss=1e-3), num_experts=a.experts, granularity=a.granularity,
                         reg_uniform=1.0, reg_entropy=0.01)
    if a.baseline:
        task = CausalLM(z_loss=1e-3)
        task.trainable = step_lib.trainable_filter(nnx.Param, (r"^model/norm/",))
        learn = base
    else:
        learn = nnx.eval_shape(lambda: task.wrap(base, nnx.Rngs(0)))
    tx = optax.adam(0.05)
    graphdef, state, frozen = step_lib.abstract_train_state(aot.on_mesh(learn, mesh, rules), tx,
                                                            trainable=task.trainable)
    bs = sharding.batch_sharding(mesh, rules, 2)
    batch = text.abstract_batch(a.batch, a.seq, bs)
    train_step = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, base_key=jax.random.key(0),
                                          trainable=task.trainable, state_shardings=step_lib.shardings_of(state),
                                          batch_shardings=step_lib.shardings_of(batch))
    t0 = time.time()
    lowered = train_step.lower(state, batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    result = {"model": a.model, "experts": 1 if a.baseline else a.experts,
              "granularity": "baseline (no soup)" if a.baseline else a.granularity, "devices": a.devices,
              "mesh": dict(mesh.shape), "rules": [list(r) for r in rules], "global_batch": a.batch, "seq": a.seq,
              "remat": a.remat, "frozen_values": sum(x.size for x in jax.tree.leaves(frozen)),
              "alpha_values": sum(x.size for x in jax.tree.leaves(state["params"])),
              "experts_per_device_gib": round(aot.bytes_per_device(frozen) / aot.GIB, 3),
              "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1), **aot.memory_report(compiled)}
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
