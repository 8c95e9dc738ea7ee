"""Multi-process training on one CPU box: 2 processes x 4 devices (gloo over loopback) vs 1 x 8.

What the data design guarantees (checked here on the pipeline directly, no JAX program needed):

* Per-process shards are disjoint and together cover the split: process ``p`` of ``P`` reads the
  strided examples ``p, p + P, ...`` (train shards cut to ``N // P`` so every process runs the same
  number of steps; eval shards padded with ``valid`` 0 so every process runs the same number of
  batches, and the masked sums count every validation example exactly once).
* In general the global batch of a 2-process run is NOT the global batch of a 1-process run:
  each process shuffles its own shard with a seed derived from ``(seed, p)`` and augments each
  example with a generator keyed on (that seed, the example's position in the *process's*
  stream). So a P-process run is a different (equally valid) sample of the data than a
  1-process run; only its distribution is the same.
* With ``input.shuffle=False`` and a deterministic transform (``scale=ratio=(1, 1)``: the
  "random" resized crop is the whole image; digits have ``hflip=0``, no RandAugment, no random
  erasing, no mixup), global batch ``k`` of 2 processes holds exactly the examples of global
  batch ``k`` of 1 process, in another order (process 0's rows ``16k, 16k+2, ...`` first, then
  process 1's). The loss is a mean and BatchNorm statistics are taken over the global batch, so
  both runs then compute the same thing up to float round-off, and this test asserts that the
  per-step losses, gradient and parameter norms, the final evaluation and the whole checkpointed
  state (parameters, BatchNorm statistics, momentum, step, RNG state) agree.

The optimizer is SGD (momentum), not the recipe's AdamW: the biases of convolutions followed by
BatchNorm have a true gradient of 0 (the norm removes them), so theirs is round-off, which Adam's
normalisation turns into updates of ~lr per step in a sign that differs between the two runs
(harmless: the next BatchNorm cancels them). With AdamW at lr 4e-3 the parameters then differ by
~1e-4 and the final validation loss by ~1e-5 relative, and a near-tie in top-1 can flip; SGD keeps
every difference at round-off, so the whole checkpointed state can be compared tightly.

The three runs go through the real command line (``lib.train.cli.main`` with
``projects.starnet.train.run``, which is what ``python -m projects.starnet.train`` executes) in a
small launcher that (1) registers the tests' tiny StarNet (``conftest.py`` does so only for this
pytest process) and (2) prints every process's returned metrics, since only process 0 prints or
writes anything. Each process gets its device count from ``JAX_NUM_CPU_DEVICES`` (the env form of
``jax_num_cpu_devices``) and the same ``XLA_FLAGS`` (unoptimised CPU codegen, for compile time),
which is why the 1 x 8 reference is a subprocess too and not this pytest process.

Both processes of the 2-process run share one workdir, as they must: orbax writes one checkpoint
directory collectively (each process its own shards, the grain iterator state as
``process_<p>-of-2.json``). ``metrics.jsonl`` there is written by process 0 alone (checked: every
step appears exactly once, where two writers would duplicate rows). The final evaluation counts
every validation example exactly once (``count == 300``), and both processes return the same
final metrics.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.starnet import digits
from lib import data

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
GLOBAL_BATCH = 16
NUM_VALIDATION = 300  # lib.data.sources.DigitsSource's held-out split
NUM_TRAIN = 1797 - NUM_VALIDATION
TIMEOUT_S = 420

# Every override that makes the 2-process global batch equal the 1-process one (see the docstring),
# SGD (see the docstring) with a rate that visibly trains in 4 steps, and what keeps the run small:
# 16x16 images, no periodic checkpoints (the final one is always written), one grain thread.
OVERRIDES = {
    "model.name": "test_starnet_tiny", "optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0,
    "total_steps": STEPS, "log_every": 1, "checkpoint_every": 0, "eval_every": 0,
    "input.batch_size": GLOBAL_BATCH, "input.image_size": 16,
    "input.shuffle": False, "input.scale": (1.0, 1.0), "input.ratio": (1.0, 1.0), "input.hflip": 0.0,
    "input.reprob": 0.0, "mixup.mixup_alpha": 0.0, "mixup.cutmix_alpha": 0.0,
    "input.num_threads": 1, "input.prefetch": 1,
}


def _flags(overrides) -> list[str]:
    def text(v):
        return f"({','.join(map(str, v))})" if isinstance(v, tuple) else str(v)
    return [f"--config.{k}={text(v)}" for k, v in overrides.items()]


LAUNCHER = r"""
import json, sys
import jax
from lib import zoo
from lib.train import cli
from projects.starnet import train
from projects.starnet.models import StarNet

# The tests' tiny StarNet (as tests/conftest.py): every layer kind, compiles in seconds.
zoo.register_model("test_starnet_tiny", lambda *, num_classes, rngs, **kw: StarNet(
    8, (1, 1, 1, 1), 2, num_classes=num_classes, rngs=rngs, **kw))

def run(config, workdir):
    result = train.run(config, workdir)
    print("RESULT " + json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                                  "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                                  **result}), flush=True)
    return result

sys.argv = ["projects/starnet/train.py"] + sys.argv[1:]
cli.main(run)
"""


def _free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"no free TCP port on 127.0.0.1 for the JAX coordinator: {e}")


def _start(args, num_devices: int, log_path: Path) -> tuple[subprocess.Popen, Path]:
    """One training process with ``num_devices`` CPU devices, in the background."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices),
               PYTHONUNBUFFERED="1",
               # Unoptimised CPU code generation: compiling the model's random init alone takes
               # ~20 s of CPU otherwise, the whole run ~2.3x longer. The same for all three runs.
               XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, "-c", LAUNCHER, "--config", "configs/starnet/digits.py:runlocal", *args,
           *_flags(OVERRIDES)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def _wait_all(procs: dict[str, tuple[subprocess.Popen, Path]], deadline: float) -> dict[str, str]:
    """Wait for every process; on a timeout or a failure kill the others (a lone gloo peer would
    wait for its partner forever) and fail with every log's tail."""
    pending = dict(procs)
    failed = None
    while pending and failed is None:
        for name, (proc, _) in list(pending.items()):
            if proc.poll() is not None:
                del pending[name]
                if proc.returncode != 0:
                    failed = f"{name} exited with {proc.returncode}"
        if pending and time.monotonic() > deadline:
            failed = f"timed out after {TIMEOUT_S} s: {sorted(pending)}"
        time.sleep(0.1)
    _kill(procs)
    logs = {name: path.read_text() for name, (_, path) in procs.items()}
    if failed:
        tails = "\n".join(f"---- {n} ----\n{log[-3000:]}" for n, log in logs.items())
        pytest.fail(f"{failed}\n{tails}")
    return logs


def _kill(procs):
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _result(log: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, log[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def _metrics(workdir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and not r.get("final")], [r for r in rows if r.get("final")]


def _restore_state(path: Path):
    """A checkpointed train state, restored onto this (single) process's 8-device mesh."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lib import sharding
    replicated = NamedSharding(sharding.make_mesh([("data", -1)]), P())
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), tree)
        return ckptr.restore(path, target)


def _as_numpy(x) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


# ------------------------------------------------------------------------------------------------
# The data design, process by process (fast: no JAX program)
# ------------------------------------------------------------------------------------------------

def _input_config(**overrides):
    cfg = digits.get_config("runlocal").input
    cfg.image_size = 16
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _ids(batch) -> list[tuple[int, bytes]]:
    """Examples of a batch as (label, pixels), which identifies a digits image here."""
    return [(int(label), image.tobytes()) for label, image in zip(batch["label"], batch["image"])]


def test_process_shards_are_disjoint_and_cover_each_split():
    cfg = _input_config(shuffle=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    # Eval: padded to equal batch counts; the real (valid 1) examples of both processes are the
    # whole validation split, each exactly once.
    shards = []
    for p in range(2):
        pipe = data.make_pipeline(cfg, train=False, batch_size=GLOBAL_BATCH // 2, seed=0, process_index=p,
                                  process_count=2)
        batches = list(pipe)
        assert len(batches) == pipe.steps_per_epoch == 19  # ceil(150 / 8), the same on both processes
        real = [e for b in batches for e, m in zip(_ids(b), b["valid"]) if m == 1]
        assert len(real) == NUM_VALIDATION // 2
        shards.append(real)
    whole = [e for b in data.make_pipeline(cfg, train=False, batch_size=GLOBAL_BATCH, seed=0, process_index=0,
                                           process_count=1) for e, m in zip(_ids(b), b["valid"]) if m == 1]
    assert len(whole) == NUM_VALIDATION
    assert sorted(shards[0] + shards[1]) == sorted(whole)
    # Train, shuffled (crops of the whole image, so pixels identify an example): one epoch of each
    # process. No example is seen more often than the split holds it (digits has a few duplicate
    # images, hence counts, not sets), so the processes' epochs are disjoint; "every process reads
    # the same stream" would see most examples twice.
    split = Counter(e for b in islice(data.make_pipeline(cfg, train=True, batch_size=1, seed=0, process_index=0,
                                                         process_count=1), NUM_TRAIN) for e in _ids(b))
    assert sum(split.values()) == NUM_TRAIN
    seen, orders = Counter(), []
    for p in range(2):
        pipe = data.make_pipeline(_input_config(shuffle=True, scale=(1.0, 1.0), ratio=(1.0, 1.0)), train=True,
                                  batch_size=8, seed=0, process_index=p, process_count=2)
        assert pipe.num_examples == NUM_TRAIN // 2 and pipe.steps_per_epoch == NUM_TRAIN // 2 // 8
        epoch = [e for b in islice(pipe, pipe.steps_per_epoch) for e in _ids(b)]
        seen.update(epoch)
        orders.append([label for label, _ in epoch])
    assert sum(seen.values()) == 2 * (NUM_TRAIN // 2 // 8) * 8
    assert all(count <= split[e] for e, count in seen.items())
    assert orders[0] != orders[1]


def test_global_batch_equals_single_process_batch_only_when_unshuffled_and_unaugmented():
    def global_batches(cfg, processes, n=3):
        its = [iter(data.make_pipeline(cfg, train=True, batch_size=GLOBAL_BATCH // processes, seed=0,
                                       process_index=p, process_count=processes)) for p in range(processes)]
        return [sorted(e for it in its for e in _ids(next(it))) for _ in range(n)]

    deterministic = _input_config(shuffle=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert global_batches(deterministic, 2) == global_batches(deterministic, 1)
    # The defaults: per-process shuffles (seeded by (seed, p)) select other examples ...
    shuffled = _input_config()
    assert [sorted(l for l, _ in b) for b in global_batches(shuffled, 2)] != \
        [sorted(l for l, _ in b) for b in global_batches(shuffled, 1)]
    # ... and even unshuffled, random crops are drawn per process stream, so the pixels differ.
    cropped = _input_config(shuffle=False)
    two, one = global_batches(cropped, 2), global_batches(cropped, 1)
    assert [sorted(l for l, _ in b) for b in two] == [sorted(l for l, _ in b) for b in one]
    assert two != one


# ------------------------------------------------------------------------------------------------
# The real thing: 2 processes x 4 devices against 1 process x 8 devices
# ------------------------------------------------------------------------------------------------

def test_two_processes_train_like_one_process_with_as_many_devices(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    shared, single = tmp_path / "two_processes", tmp_path / "one_process"
    deadline = time.monotonic() + TIMEOUT_S
    procs = {f"process{p}": _start(["--workdir", str(shared), "--coordinator", coordinator, "--num_processes", "2",
                                    "--process_id", str(p)], 4, tmp_path / f"process{p}.log") for p in range(2)}
    procs["single"] = _start(["--workdir", str(single)], 8, tmp_path / "single.log")
    logs = _wait_all(procs, deadline)

    results = {name: _result(log) for name, log in logs.items()}
    for p in range(2):
        r = results[f"process{p}"]
        assert (r["process_index"], r["process_count"], r["local_devices"], r["devices"]) == (p, 2, 4, 8)
    r = results["single"]
    assert (r["process_index"], r["process_count"], r["local_devices"], r["devices"]) == (0, 1, 8, 8)
    # Only process 0 prints; both hold the same (globally reduced) final metrics.
    assert "final: top1=" in logs["process0"] and "final: top1=" not in logs["process1"]
    assert "step 1/" not in logs["process1"]
    assert results["process0"] == {**results["process1"], "process_index": 0}
    two, one = results["process0"], results["single"]
    assert two["step"] == one["step"] == STEPS
    assert two["count"] == one["count"] == NUM_VALIDATION  # every validation example exactly once
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    assert abs(two["top1"] - one["top1"]) <= 1 / NUM_VALIDATION  # argmax: a near-tie may flip one

    # metrics.jsonl: one writer (process 0); a second would duplicate rows of the shared file.
    train_rows, final_rows = _metrics(shared)
    ref_rows, ref_final = _metrics(single)
    assert [r["step"] for r in train_rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    assert len(final_rows) == len(ref_final) == 1 and final_rows[0].keys() == ref_final[0].keys()
    counts = {k: v for k, v in final_rows[0].items() if k.endswith("count")}
    assert counts and set(counts.values()) == {NUM_VALIDATION}, final_rows[0]
    assert json.loads((shared / "provenance.json").read_text())["process_count"] == 2
    for a, b in zip(train_rows, ref_rows):
        assert np.isfinite(a["loss"]) and a["lr"] == b["lr"] > 0
        np.testing.assert_allclose([a["loss"], a["grad_norm"], a["param_norm"]],
                                   [b["loss"], b["grad_norm"], b["param_norm"]], rtol=1e-5,
                                   err_msg=f"step {a['step']}")
        assert abs(a["top1"] - b["top1"]) <= 1 / GLOBAL_BATCH
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3  # it trains (deterministic data: no flake)

    # The collectively written checkpoint: one directory with both processes' parts; it restores
    # onto this single process's 8 devices and equals the 1-process run's final state.
    step_dir = shared / "checkpoints" / str(STEPS)
    assert (step_dir / "commit_success.txt").exists() or (step_dir / "_CHECKPOINT_METADATA").exists()
    for p in range(2):
        assert json.loads((step_dir / "data" / f"process_{p}-of-2.json").read_text())["next_index"] == STEPS
    assert json.loads((single / "checkpoints" / str(STEPS) / "data" / "process_0-of-1.json").read_text()) \
        == {"next_index": STEPS}
    restored = _restore_state(step_dir / "state")
    expected = _restore_state(single / "checkpoints" / str(STEPS) / "state")
    assert int(restored["step"]) == STEPS
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(expected)):
        name = jax.tree_util.keystr(path)
        x, y = _as_numpy(x), _as_numpy(y)
        if np.issubdtype(x.dtype, np.floating):  # momentum of the zero-gradient biases: round-off, ~1e-9
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
        else:  # the step, RNG counters and keys
            np.testing.assert_array_equal(x, y, err_msg=name)
