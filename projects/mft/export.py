"""Bake a run's masks and write an ordinary dense HF checkpoint (plus ``masks.safetensors``):

    python -m projects.mft.export --config CONFIG --workdir RUN --out DIR [--baseline random|l1] [--dtype bfloat16]

* an MFT run (``stage=mft``): ``W * mask`` in the masked layers (upstream ``scripts/apply_masks.py``)
  and the masks in upstream's module names (``model.layers.20.mlp.up_proj``, bool ``[out, in]``);
* an FFT run: its weights as they are, or with ``--baseline``: upstream's built-in baselines over the
  FFT weights in the config's ``mft.layers``: ``random`` (Bernoulli masks keeping ``mft.keep``) or
  ``l1`` (the ``int((1 - keep) n)`` smallest ``|w|`` of each matrix pruned).

transformers, vLLM and lm-eval load the result as any LLaMA checkpoint. The latest checkpoint of
RUN is exported (``--best``: the best evaluated weights). Nothing at ``--out`` is replaced unless
it is an HF checkpoint of the same architecture (or ``--overwrite``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from lib import zoo
from lib.models import llama
from lib.train import cli, loop
from projects.mft import masking, task  # noqa: F401  (task registers "mft")

flags.DEFINE_string("out", None, "The HF checkpoint directory to write.")
flags.DEFINE_enum("baseline", "none", ["none", "random", "l1"], "FFT runs: upstream's random or L1 mask baselines.")
flags.DEFINE_string("dtype", "bfloat16", "Tensor dtype of the export (bfloat16, float32, float16).")
flags.DEFINE_bool("best", False, "Export the best evaluated weights (workdir/best) instead of the latest.")
flags.DEFINE_bool("overwrite", False, "Replace whatever is at --out.")
flags.DEFINE_integer("baseline_seed", 0, "Seed of the random-mask baseline.")
FLAGS = flags.FLAGS


def export(config, workdir, out, **kwargs) -> Path:
    """Restore the run in ``workdir`` (its latest checkpoint) and export it (:func:`export_run`)."""
    workdir = Path(workdir)
    if not (workdir / "checkpoints").exists() and not (workdir / "best").exists():
        raise loop.ConfigError(f"{workdir} holds no checkpoint of a run (train first, with checkpoint_every > 0)")
    return export_run(loop.setup(config, workdir), out, **kwargs)


def export_run(run: loop.Run, out, *, baseline: str = "none", dtype: str = "bfloat16", best: bool = False,
               overwrite: bool = False, baseline_seed: int = 0) -> Path:
    """Write the model of a set-up run (:func:`lib.train.loop.setup`) as a dense HF checkpoint."""
    config = run.config
    model = run.model()
    if best:
        zoo.load_weights(model, run.workdir / "best")
    masks = None
    if config.get("task") == "mft":
        if baseline != "none":
            raise loop.ConfigError("--baseline applies to FFT runs (the baselines replace MFT's learned masks)")
        masks = masking.layer_masks(model)
        model = masking.bake(model)
    elif baseline != "none":
        masks = masking.apply_baseline(model, config.mft.layers, kind=baseline, keep=config.mft.keep,
                                       subnet_mode=config.mft.subnet_mode, seed=baseline_seed)
    from lib.data import text
    tokenizer = text.get_tokenizer(config.input)
    extra = None
    if masks is not None:
        def write_masks(path, masks=masks):
            from safetensors.numpy import save_file
            save_file({k: v.astype(np.uint8) for k, v in masks.items()}, str(path), metadata={"format": "pt"})
        extra = {"masks.safetensors": write_masks}
    try:
        return llama.export_hf(model, out, tokenizer, dtype=dtype, overwrite=overwrite, extra_files=extra)
    except FileExistsError as e:
        raise loop.ConfigError(str(e)) from None


def _run(config, workdir):
    if not FLAGS.out:
        raise loop.ConfigError("--out is required: the HF checkpoint directory to write")
    out = export(config, workdir, FLAGS.out, baseline=FLAGS.baseline, dtype=FLAGS.dtype, best=FLAGS.best,
                 overwrite=FLAGS.overwrite, baseline_seed=FLAGS.baseline_seed)
    print(f"exported {out}")


if __name__ == "__main__":
    cli.main(_run)
