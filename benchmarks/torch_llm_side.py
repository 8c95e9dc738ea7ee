"""The PyTorch half of ``benchmarks/llm.py --vs-torch``: transformers' ``LlamaForCausalLM``, one JSON line.

Runs in its own interpreter (a venv with torch and transformers, see ``benchmarks/README.md``); it
imports neither JAX nor the repository's models, only ``lib/host_malloc.py`` (plain ``ctypes``), so
that both sides run with the same malloc settings. The model is built from the same HF
``config.json`` dict as the JAX zoo entry (``--config``: a file written by ``benchmarks/llm.py``),
randomly initialised, float32, ``attn_implementation="eager"``.

    python benchmarks/torch_llm_side.py --config cfg.json --mode train --batch-size 4 --seq-len 512 --threads 2
    python benchmarks/torch_llm_side.py --config cfg.json --mode decode --batch-size 8 --prompt-len 64 \
        --new-tokens 128 --threads 2

* ``train``: ``model.train()``; forward (all logits, float32), token cross-entropy summed over the
  loss mask / its count (as ``lib.tasks.causal_lm``), backward, AdamW (lr 1e-3, no weight decay,
  ``fused=True``) step, ``zero_grad``. Variant ``compile`` wraps the model and the optimizer step
  in ``torch.compile`` (train only).
* ``decode``: ``model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=N,
  min_new_tokens=N)`` (greedy, transformers' default dynamic KV cache) under
  ``torch.inference_mode()``; ``prefill_ms`` times the prompt's forward with ``use_cache=True``.
* The token ids are drawn with ``numpy.random.default_rng(seed)`` exactly as the JAX side draws
  them, so both frameworks see the same batches and prompts.
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
import time
import traceback

import machine  # benchmarks/machine.py: this script's folder is on sys.path when run as a script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import host_malloc  # noqa: E402  (ctypes only; the repository root was just put on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="HF config.json of the model (a file)")
    p.add_argument("--model", default="smollm2_135m", help="label for the JSON line")
    p.add_argument("--mode", choices=("train", "decode"), default="train")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="train: tokens per row")
    p.add_argument("--prompt-len", type=int, default=64, help="decode: prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: generated tokens per row")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variant", choices=("eager", "compile"), default="eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-malloc", choices=("retain", "default"), default="retain",
                   help="retain: lib.host_malloc.retain_freed_memory() before torch starts (as the JAX side)")
    return p.parse_args(argv)


def make_train_batch(np, rng, batch: int, seq: int, vocab: int) -> dict:
    """The same arrays as ``benchmarks/llm.py``'s ``make_train_batch`` (same generator calls)."""
    ids = rng.integers(3, vocab, (batch, seq + 1), dtype=np.int64)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}


def make_prompts(np, rng, batch: int, length: int, vocab: int):
    return rng.integers(3, vocab, (batch, length), dtype=np.int64)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.host_malloc_applied = args.host_malloc == "retain" and host_malloc.retain_freed_memory()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    threads = args.threads or len(cores)
    if threads < len(cores) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores[:threads])  # the same cores as the JAX process
    cache_dir = tempfile.mkdtemp(prefix="torchinductor_llm_")   # a cold torch.compile, as JAX's compile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        return _run(args, threads)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _run(args, threads: int) -> dict:
    import numpy as np
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    with open(args.config) as f:
        hf_config = json.load(f)
    config = LlamaConfig(**hf_config)
    config._attn_implementation = "eager"   # transformers' own attention code (its default would be SDPA)
    row = {"framework": "torch", "variant": args.variant, "model": args.model, "mode": args.mode,
           "batch": args.batch_size, "dtype": "float32", "attn_implementation": "eager",
           "host_malloc": args.host_malloc, "host_malloc_applied": args.host_malloc_applied,
           "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if args.mode == "train":
        row["seq_len"] = args.seq_len
    else:
        row.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    model = LlamaForCausalLM(config).float()
    row["attn_implementation"] = model.config._attn_implementation
    row["num_params"] = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(args.seed)

    if args.mode == "train":
        tokens_per_call = args.batch_size * args.seq_len
        b = make_train_batch(np, rng, args.batch_size, args.seq_len, config.vocab_size)
        ids, targets = torch.from_numpy(b["input_ids"]), torch.from_numpy(b["targets"])
        loss_mask = torch.from_numpy(b["loss_mask"])
        model.train()
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
            row["optimizer"] = "AdamW(fused)"
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
            row["optimizer"] = "AdamW"
        fwd = torch.compile(model) if args.variant == "compile" else model
        opt_step = torch.compile(opt.step) if args.variant == "compile" else opt.step

        def call():
            logits = fwd(input_ids=ids, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            loss = (nll * loss_mask.flatten()).sum() / loss_mask.sum()
            loss.backward()
            opt_step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        if args.variant != "eager":
            row["error"] = "decode: only the eager variant is measured"
            print(json.dumps(row), flush=True)
            return row
        tokens_per_call = args.batch_size * args.new_tokens
        prompts = torch.from_numpy(make_prompts(np, rng, args.batch_size, args.prompt_len, config.vocab_size))
        mask = torch.ones_like(prompts)
        model.eval()
        gen_kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      pad_token_id=0)

        def call():
            with torch.inference_mode():
                return model.generate(input_ids=prompts, attention_mask=mask, **gen_kw)

        def prefill():
            with torch.inference_mode():
                return model(input_ids=prompts, attention_mask=mask, use_cache=True)

    try:
        first_call_s, times, out, cpu0, cpu1 = machine.time_calls(call, args.warmup, args.steps)
        if args.mode == "decode":
            row["generated_shape"] = list(out.shape)
            assert out.shape == (args.batch_size, args.prompt_len + args.new_tokens), out.shape
            prefill()
            pre = []
            for _ in range(max(3, args.steps)):
                t0 = time.perf_counter()
                prefill()
                pre.append(time.perf_counter() - t0)
            row["prefill_ms"] = round(1000 * statistics.median(pre), 2)
    except Exception as e:  # noqa: BLE001 (e.g. torch.compile without a working C++ compiler)
        row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        row["traceback_tail"] = traceback.format_exc()[-1500:]
        print(json.dumps(row), flush=True)
        return row
    if args.mode == "train":
        row["final_loss"] = round(float(out.detach()), 4)
    mean, med = statistics.mean(times), statistics.median(times)
    row.update({
        "tokens_per_s": round(tokens_per_call / mean, 1),
        "tokens_per_s_median": round(tokens_per_call / med, 1),
        "mean_step_ms": round(1000 * mean, 2), **machine.call_stats(times, cpu0, cpu1),
        "steps": args.steps, "warmup": args.warmup,
        # eager: no compilation; the first call (allocation, oneDNN kernel selection) is reported
        # as first_call_s, and compile_s only for torch.compile (its first call).
        "first_call_s": round(first_call_s, 2),
        "compile_s": round(first_call_s, 2) if args.variant == "compile" else None,
    })
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
