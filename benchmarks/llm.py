"""LLaMA decoder benchmarks: train-step and greedy-decode tokens/s on CPU, optionally against
transformers; ahead-of-time compiled 7B/8B train steps on simulated 8-device meshes. One JSON line per run.

    python -m benchmarks.llm                                  # smollm2_135m float32: train (4 x 512) and decode
    python -m benchmarks.llm --vs-torch                       # + transformers LlamaForCausalLM, own interpreter
    python -m benchmarks.llm --mode decode --decode-batch 8 --prompt-len 64 --new-tokens 128
    python -m benchmarks.llm --mode train --profile 2         # + XLA op time by kind (benchmarks/op_profile.py)
    python -m benchmarks.llm --aot                            # llama2_7b / llama3_8b, FSDP and FSDP x TP, 8 devices

What is measured (JAX side):

* ``train``: the real step of ``lib.train.step.make_train_step`` with ``lib.tasks.causal_lm.CausalLM``
  (forward, token cross-entropy over the loss mask as (sum, count), backward, AdamW lr 1e-3 without
  weight decay, state donated) on a ``[batch, seq_len]`` batch of ``input_ids`` / ``targets`` /
  ``loss_mask`` / ``segment_ids`` / ``positions`` (one segment per row, all tokens trained).
  ``tokens_per_s`` = batch x seq_len / mean step time over ``--steps`` timed calls after
  ``--warmup`` untimed ones (the median is given too). ``--remat`` is the layer remat policy (default
  ``none``: a 135M model on a CPU has the memory, and ``full`` would recompute every forward).
* ``decode``: ``lib.models.llama.generate.generate``'s compiled program (prefill, then the greedy
  decode loop with the KV cache inside one ``lax.while_loop``), no stop tokens, so every row makes
  ``--new-tokens`` tokens; ``tokens_per_s`` = decode_batch x new_tokens / mean time of the whole call
  (prefill included, as for transformers' ``generate``). ``prefill_ms``: the prompt's forward alone.
* ``compile_s``: ``jitted.lower(...).compile()`` (tracing + XLA compilation), reported apart from
  the step times; ``first_call_s``: the first execution.
* memory (``xla_*_bytes`` from ``compiled.memory_analysis()``), ``rss_peak_mib``, ``loadavg``,
  ``other_cpu_pct`` (CPU other processes took during the timed calls, % of all cores; well above 0
  means the figures were disturbed) and ``own_cpu_cores``, as ``benchmarks/throughput.py``.

``--vs-torch`` runs ``benchmarks/torch_llm_side.py`` in another interpreter (``--torch-python``, default
``$BENCH_TORCH_PYTHON`` or ``benchmarks/.torchenv/bin/python``; see ``benchmarks/README.md``):
transformers' ``LlamaForCausalLM`` from the same ``config.json`` dict, eager attention, float32,
the same shapes, token ids, step and thread count, then a ratio line (JAX tokens/s / PyTorch tokens/s).

``--aot``: for each of ``--aot-models`` x ``--aot-meshes`` (``fsdp``: data=8; ``fsdp_tp``: data=4 x
model=2, with ``lib.models.llama.RULES``) x ``--aot-param-dtypes``, the train step of an abstract
sharded model (``dtype=bfloat16`` compute, ``remat=--aot-remat``, global batch ``--aot-batch`` x
``--aot-seq``) is lowered and compiled for 8 simulated CPU devices, nothing allocated; the row gives
the per-device ``compiled.memory_analysis()`` (argument, output, temp, alias; peak = argument +
output + temp - alias) and the compile time, and ``state_bytes_per_device`` (params + AdamW moments
of one device's shards, from the shardings).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.throughput import _emit, _environment, _memory, _setup_process, _split

HERE = Path(__file__).resolve().parent
DEFAULT_TORCH_PYTHON = os.environ.get("BENCH_TORCH_PYTHON") or str(HERE / ".torchenv" / "bin" / "python")
AOT_MESHES = {"fsdp": (("data", 8),), "fsdp_tp": (("data", 4), ("model", 2))}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="zoo LLaMA name (default smollm2_135m)")
    p.add_argument("--mode", default="train,decode", help="train and/or decode (comma-separated)")
    p.add_argument("--batch-size", type=int, default=4, help="train: rows per step")
    p.add_argument("--seq-len", type=int, default=512, help="train: tokens per row")
    p.add_argument("--decode-batch", type=int, default=8, help="decode: prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="decode: tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated per prompt")
    p.add_argument("--no-prefill", dest="prefill", action="store_false",
                   help="decode: do not compile and time the prefill alone (prefill_ms)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="per-layer remat policy of the train step (default none)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument("--steps", type=int, default=5, help="timed calls")
    p.add_argument("--threads", type=int, default=None, help="cores for both frameworks (default: all "
                   "schedulable); pins this process and the PyTorch one to the first N cores")
    p.add_argument("--host-malloc", choices=("retain", "default"), default="retain",
                   help="lib.host_malloc.retain_freed_memory() in both processes (default, as the training CLI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more calls: XLA op time by kind and the slowest ops")
    p.add_argument("--vs-torch", action="store_true", help="also run transformers' LlamaForCausalLM "
                   "(benchmarks/torch_llm_side.py) in --torch-python and print the ratios")
    p.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON,
                   help="interpreter with torch + transformers (default $BENCH_TORCH_PYTHON, else "
                   "benchmarks/.torchenv/bin/python)")
    p.add_argument("--torch-variants", default="eager", help="eager and/or compile (compile: train only)")
    p.add_argument("--torch-timeout", type=float, default=3600, help="seconds per PyTorch subprocess")
    g = p.add_argument_group("ahead-of-time compilation (--aot: only these runs)")
    g.add_argument("--aot", action="store_true", help="compile sharded train steps for 8 simulated devices")
    g.add_argument("--aot-models", default="llama2_7b,llama3_8b")
    g.add_argument("--aot-meshes", default="fsdp,fsdp_tp", help=f"of {sorted(AOT_MESHES)}")
    g.add_argument("--aot-param-dtypes", default="float32,bfloat16")
    g.add_argument("--aot-batch", type=int, default=8, help="global batch")
    g.add_argument("--aot-seq", type=int, default=4096)
    g.add_argument("--aot-remat", choices=("none", "full", "dots"), default="full")
    args = p.parse_args(argv)
    args.mode = _split([args.mode])
    for m in args.mode:
        if m not in ("train", "decode"):
            p.error(f"--mode must be train or decode, got {m!r}")
    args.aot_models = _split([args.aot_models])
    args.aot_meshes = _split([args.aot_meshes])
    args.aot_param_dtypes = _split([args.aot_param_dtypes])
    for m in args.aot_meshes:
        if m not in AOT_MESHES:
            p.error(f"--aot-meshes: {m!r} is not one of {sorted(AOT_MESHES)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1, --warmup >= 0")
    args.devices = 8 if args.aot else 1   # for throughput._setup_process
    return args


# ------------------------------------------------------------------------------------------------
# inputs: the same generator calls as benchmarks/torch_llm_side.py, so both sides get the same ids
# ------------------------------------------------------------------------------------------------
def make_train_batch(rng, batch: int, seq: int, vocab: int) -> dict:
    import numpy as np
    ids = rng.integers(3, vocab, (batch, seq + 1), dtype=np.int64)
    return {"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "loss_mask": np.ones((batch, seq), np.float32), "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def make_prompts(rng, batch: int, length: int, vocab: int):
    import numpy as np
    return rng.integers(3, vocab, (batch, length), dtype=np.int64)


def _create(name: str, args, **kw):
    import jax.numpy as jnp
    from lib import zoo
    if args.dtype == "bfloat16":
        kw["dtype"] = jnp.bfloat16
    return zoo.create_model(name, rngs=args.seed, **kw)


def _time(call, args):
    """first_call_s, per-call seconds of the timed calls, the last output, CPU snapshots around them."""
    import jax
    return machine.time_calls(call, args.warmup, args.steps, wait=jax.block_until_ready)


def _summary(tokens: int, times, first, compile_s, cpu0, cpu1, args) -> dict:
    mean, med = statistics.mean(times), statistics.median(times)
    return {"tokens_per_s": round(tokens / mean, 1), "tokens_per_s_median": round(tokens / med, 1),
            "mean_step_ms": round(1000 * mean, 2), **machine.call_stats(times, cpu0, cpu1),
            "steps": args.steps, "warmup": args.warmup, "compile_s": round(compile_s, 2),
            "first_call_s": round(first, 2)}


def _profile(result, compiled, call, args):
    if args.profile:
        from benchmarks import op_profile
        result["op_profile"] = op_profile.profile(compiled, call, steps=args.profile)
        print(op_profile.format_report(result["op_profile"]), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# JAX side
# ------------------------------------------------------------------------------------------------
def _base(name, mode, args) -> dict:
    return {"framework": "jax", "model": name, "mode": mode, "dtype": args.dtype, "threads": args.threads,
            "host_malloc": args.host_malloc, "host_malloc_applied": args.host_malloc_applied}


def run_train(name: str, args) -> dict:
    import jax
    import numpy as np
    from lib import zoo
    from lib.tasks.causal_lm import CausalLM
    from lib.train import optim, step as step_lib

    result = {**_base(name, "train", args), "batch": args.batch_size, "seq_len": args.seq_len,
              "remat": args.remat}
    model = _create(name, args, remat=args.remat)
    result["num_params"] = zoo.count_params(model)
    vocab = model.config.vocab_size
    tx = optim.make_optimizer(lambda s: 1e-3, weight_decay=0.0)
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False)
    del model
    fn = step_lib.make_train_step(graphdef, tx, CausalLM(), frozen=frozen, base_key=jax.random.key(args.seed),
                                  donate=True)
    batch = {k: jax.numpy.asarray(v) for k, v in
             make_train_batch(np.random.default_rng(args.seed), args.batch_size, args.seq_len, vocab).items()}
    compiled, compile_s = machine.compile_timed(fn, state, batch)
    box = [state]
    del state

    def call():
        box[0], metrics = compiled(box[0], fn.frozen, batch, fn.consts)   # donated: thread the state through
        return box[0], metrics

    first, times, out, cpu0, cpu1 = _time(call, args)
    loss = float(jax.device_get(out[1]["loss"]))
    result.update(_summary(args.batch_size * args.seq_len, times, first, compile_s, cpu0, cpu1, args),
                  final_loss=round(loss, 4) if np.isfinite(loss) else str(loss), **_memory(compiled),
                  **_environment())
    _profile(result, compiled, call, args)
    return result


def run_decode(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from lib import zoo
    from lib.models.llama import generate as gen

    b, n = args.decode_batch, args.new_tokens
    result = {**_base(name, "decode", args), "batch": b, "prompt_len": args.prompt_len, "new_tokens": n,
              "sampling": "greedy", "stop_tokens": []}
    model = _create(name, args)
    result["num_params"] = zoo.count_params(model)
    prompts = make_prompts(np.random.default_rng(args.seed), b, args.prompt_len, model.config.vocab_size)
    # What gen.generate(model, prompts, max_new_tokens=n, stop_tokens=[]) runs, compiled ahead of time
    # so that compilation is timed apart from the calls.
    ids, mask, _, pad_id = gen._prepare(model, prompts.tolist(), n, None)
    graphdef, state = nnx.split(model)
    run, prefill, _ = gen._compiled(graphdef, gen.Sampling(), n, pad_id)
    inputs = (state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(args.seed), gen._stop_array(()))
    compiled, compile_s = machine.compile_timed(run, *inputs)

    def call():
        return compiled(*inputs)

    first, times, out, cpu0, cpu1 = _time(call, args)
    tokens, lengths = np.asarray(out[0]), np.asarray(out[1])
    assert tokens.shape == (b, n) and (lengths == n).all(), (tokens.shape, lengths)
    result.update(_summary(b * n, times, first, compile_s, cpu0, cpu1, args), **_memory(compiled),
                  **_environment())
    if args.prefill:   # the prompt's forward alone, and from it the time per decode step
        compiled_prefill, prefill_compile_s = machine.compile_timed(prefill, *inputs[:3])
        result["prefill_compile_s"] = round(prefill_compile_s, 2)
        pre = []
        jax.block_until_ready(compiled_prefill(*inputs[:3]))
        for _ in range(max(3, args.steps)):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled_prefill(*inputs[:3]))
            pre.append(time.perf_counter() - t0)
        result["prefill_ms"] = round(1000 * statistics.median(pre), 2)
        result["decode_step_ms"] = round((result["mean_step_ms"] - result["prefill_ms"]) / n, 2)
    _profile(result, compiled, call, args)
    return result


# ------------------------------------------------------------------------------------------------
# PyTorch side (another interpreter)
# ------------------------------------------------------------------------------------------------
def run_torch(name: str, mode: str, args) -> list[dict]:
    from lib.models import llama

    base = {"framework": "torch", "model": name, "mode": mode, "threads": args.threads}
    variants = _split([args.torch_variants])
    error = None
    if name not in llama.CONFIGS:
        error = f"{name} is not a LLaMA zoo entry (lib.models.llama.CONFIGS)"
    elif not Path(args.torch_python).exists():
        error = (f"PyTorch interpreter {args.torch_python} not found; see benchmarks/README.md "
                 "(LLaMA: PyTorch comparison environment)")
    if error:
        return [{**base, "variant": v, "error": error} for v in variants]
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm_bench_") as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(llama.CONFIGS[name]))
        for variant in variants:
            cmd = [str(args.torch_python), str(HERE / "torch_llm_side.py"), "--config", str(cfg), "--model", name,
                   "--mode", mode, "--threads", str(args.threads), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--variant", variant, "--seed", str(args.seed),
                   "--host-malloc", args.host_malloc]
            if mode == "train":
                cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            else:
                cmd += ["--batch-size", str(args.decode_batch), "--prompt-len", str(args.prompt_len),
                        "--new-tokens", str(args.new_tokens)]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
            env["OMP_NUM_THREADS"] = str(args.threads)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torch_timeout, env=env)
            except subprocess.TimeoutExpired:
                rows.append({**base, "variant": variant, "error": f"timed out after {args.torch_timeout}s"})
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                rows.append({**base, "variant": variant,
                             "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"})
                continue
            rows.append(json.loads(lines[-1]))
    return rows


def ratios(jax_row: dict, torch_rows: list[dict]) -> dict:
    out = {"ratio": "jax_tokens_per_s / torch_tokens_per_s", "model": jax_row["model"], "mode": jax_row["mode"],
           "jax_tokens_per_s": jax_row.get("tokens_per_s")}
    for row in torch_rows:
        key = f"torch_{row.get('variant', '?')}"
        tps = row.get("tokens_per_s")
        out[f"{key}_tokens_per_s"] = tps
        j = jax_row.get("tokens_per_s")
        out[f"jax_over_{key}"] = round(j / tps, 3) if j and tps else None
    return out


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation of sharded train steps
# ------------------------------------------------------------------------------------------------
def run_aot(name: str, mesh_kind: str, param_dtype: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from lib import sharding, zoo
    from lib.data import text
    from lib.models import llama
    from lib.tasks.causal_lm import CausalLM
    from lib.train import aot, optim, step as step_lib

    axes = AOT_MESHES[mesh_kind]
    result = {"framework": "jax", "mode": "aot_train", "model": name, "mesh": dict(axes), "rules": mesh_kind,
              "devices": 8, "batch": args.aot_batch, "seq_len": args.aot_seq, "dtype": "bfloat16",
              "param_dtype": param_dtype, "remat": args.aot_remat}
    mesh = sharding.make_mesh(axes, devices=jax.devices()[:8])
    rules = llama.RULES[mesh_kind]
    t0 = time.perf_counter()
    model = zoo.create_model(name, abstract=True, mesh=mesh, sharding_rules=rules, dtype=jnp.bfloat16,
                             param_dtype=jnp.dtype(param_dtype), remat=args.aot_remat)
    result["num_params"] = zoo.count_params(model)
    tx = optim.make_optimizer(lambda s: 1e-3, weight_decay=0.0)
    graphdef, state, frozen = step_lib.abstract_train_state(model, tx)
    del model
    result["param_bytes_per_device"] = aot.bytes_per_device(state["params"])
    result["state_bytes_per_device"] = aot.bytes_per_device(state)
    b_sh = sharding.batch_sharding(mesh, rules, ndim=2)
    shape = (args.aot_batch, args.aot_seq)
    batch = text.abstract_batch(*shape, b_sh)
    fn = step_lib.make_train_step(graphdef, tx, CausalLM(), frozen=frozen, base_key=jax.random.key(0),
                                  state_shardings=step_lib.shardings_of(state),
                                  batch_shardings={k: b_sh for k in batch}, donate=True)
    t1 = time.perf_counter()
    lowered = fn.lower(state, batch)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    result.update({"setup_s": round(t1 - t0, 2), "lower_s": round(t2 - t1, 2), "compile_s": round(t3 - t2, 2),
                   **_memory(compiled), "rss_peak_mib": machine.rss_peak_mib(), **_environment()})
    gib = 2 ** 30
    result["per_device_gib"] = {k: round(result[f"xla_{k}_bytes"] / gib, 2)
                                for k in ("argument", "output", "temp", "alias", "peak")}
    return result


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    _setup_process(args)          # malloc, thread pinning, simulated devices: before JAX starts
    import lib.models.llama  # noqa: F401  (registers the zoo entries)

    rows: list[dict] = []
    if args.aot:
        for name in args.aot_models:
            for mesh_kind in args.aot_meshes:
                for pdt in args.aot_param_dtypes:
                    try:
                        _emit(run_aot(name, mesh_kind, pdt, args), rows)
                    except Exception as e:  # noqa: BLE001 (report every configuration)
                        _emit({"framework": "jax", "mode": "aot_train", "model": name, "rules": mesh_kind,
                               "param_dtype": pdt, "error": f"{type(e).__name__}: {str(e)[:1500]}"}, rows)
        return rows
    for mode in args.mode:
        # PyTorch first: this process keeps the heap it retained (lib.host_malloc) after a JAX run,
        # and both together may not fit in a small machine's memory.
        torch_rows = run_torch(args.model, mode, args) if args.vs_torch else []
        jax_row = run_train(args.model, args) if mode == "train" else run_decode(args.model, args)
        _emit(jax_row, rows)
        if args.vs_torch:
            for row in torch_rows:
                _emit(row, rows)
            _emit(ratios(jax_row, torch_rows), rows)
    return rows


if __name__ == "__main__":
    main()
