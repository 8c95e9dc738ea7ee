"""Train a learnable soup (only its mixing weights) through the generic loop:
``python -m projects.souplm.train --config configs/souplm/lm.py:experts=A+B,granularity=layer --workdir DIR``.

The config's ``task = "soup"`` (``lib.soup.SoupTask``) wraps the loop's model into a
``LearnableSoup`` of the experts ``soup.experts`` (HF directories, ``.gguf`` files or weights
directories) around the inner task ``soup.task`` ("causal_lm", "classification"). Besides the loop's
usual output (``best/`` holds the baked soup, an ordinary model), the run writes
``soup_weights.json``: the learned weights per group (``[K]`` or ``[K, L]``) and which group each
parameter belongs to, which ``python -m projects.souplm.merge --method soup`` bakes into an HF
checkpoint tensor by tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from lib import soup
from lib.train import cli, loop


def soup_weights(learn: soup.LearnableSoup, experts) -> dict:
    return {"num_experts": learn.k, "experts": [str(e) for e in experts], "granularity": learn.granularity,
            "groups": {k: v.tolist() for k, v in learn.coefficients().items()},
            "variables": learn.variable_groups()}


def run(config, workdir):
    if config.get("task") != "soup":
        raise loop.ConfigError(f"task={config.get('task')!r}: a soup run needs task='soup' (configs/souplm)")
    r = loop.setup(config, workdir)
    log = loop._MetricsLog(r)
    try:
        if not config.get("eval_only") and not loop.train(r, log):
            return {"preempted": True, "step": int(r.state["step"])}
        result = loop.final_evaluation(r)
        log.write({"final": True, "step": result["step"],
                   **{f"val_{k}": v for k, v in result.items() if k != "step"}})
    finally:
        r.checkpointer.close()
        log.close()
    learn = nnx.merge(r.graphdef, r.state["params"], r.train_step.frozen, r.state["rest"])
    weights = soup_weights(learn, config.soup.experts)
    if loop._is_main():
        (Path(workdir) / "soup_weights.json").write_text(json.dumps(weights, indent=1) + "\n")
    metric = r.task.best[0]
    extras = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in result.items() if k not in (metric, "step"))
    loop._print(f"final: {metric}={result[metric]:.4f} step={result['step']} {extras}")
    return result


if __name__ == "__main__":
    cli.main(run)
