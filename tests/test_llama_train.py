"""LLM fine-tuning through the generic loop: the causal-LM task learns, and a resumed run equals an
uninterrupted one bit for bit (iterator state, optimizer, schedule); init_from an HF directory."""
import json
import os
import signal

import numpy as np
import pytest

from configs.llama import sft
from lib.train import loop, schedules


def tiny_config(**overrides):
    c = sft.get_config("runlocal=True")
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "final" not in r and "step" in r]


def test_lm_training_learns_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    full = loop.run(tiny_config(total_steps=6, checkpoint_every=3), tmp_path / "full")
    # Interrupted as a preempted job is (SIGTERM while fetching the third batch), not by a shorter
    # run: the linear schedule's length is total_steps, so a 3-step run would be another schedule.
    real, calls = loop._global_batch, []

    def preempt_on_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_global_batch", preempt_on_third_batch)
        first = loop.run(tiny_config(total_steps=6, checkpoint_every=0), tmp_path / "resumed")
    assert first == {"preempted": True, "step": 3}
    resumed = loop.run(tiny_config(total_steps=6, checkpoint_every=3), tmp_path / "resumed")
    assert resumed == full
    a, b = metrics(tmp_path / "full"), {r["step"]: r for r in metrics(tmp_path / "resumed")}
    assert len(a) >= 3 and all(r["step"] in b for r in a)
    for x in a:
        for key in ("loss", "grad_norm", "lr"):
            assert x[key] == b[x["step"]][key], (x["step"], key)
    assert a[-1]["loss"] < a[0]["loss"] - 0.2            # it learns (byte-level arithmetic chats)
    assert full["perplexity"] == pytest.approx(np.exp(full["loss"]), rel=1e-6)
    assert 0 < full["accuracy"] < 1


def test_linear_schedule_is_transformers_linear_with_warmup():
    """get_linear_schedule_with_warmup: lr * s / w for s < w (0 at the first update), then linear to 0."""
    total, ratio, lr = 100, 0.03, 2e-5
    sched = schedules.make_schedule(lr=lr, min_lr=0, epochs=1, steps_per_epoch=total, kind="linear",
                                    warmup_ratio=ratio, per_epoch=False)
    warmup = 3   # ceil(0.03 * 100)
    want = [lr * s / warmup if s < warmup else lr * max(0.0, (total - s) / (total - warmup)) for s in range(total + 2)]
    np.testing.assert_allclose([float(sched(s)) for s in range(total + 2)], want, rtol=1e-6, atol=1e-12)
