"""Full fine-tuning or Mask Fine-Tuning: ``python -m projects.mft.train --config CONFIG --workdir DIR``.

    python -m projects.mft.train --config configs/mft/llama2_7b.py:domain=coding,stage=fft,init_from=/ckpt/llama2 --workdir W
    python -m projects.mft.train --config configs/mft/llama2_7b.py:domain=coding,stage=mft,init_from=/ckpt/fft_hf --workdir W

``stage=mft`` uses the ``"mft"`` task (projects/mft/task.py): the layers of ``config.mft`` masked
over the ``init_from`` weights, only the scores trained. Then ``projects.mft.export`` bakes the masks.
"""
from lib.train import cli, loop
from projects.mft import task  # noqa: F401  (registers the "mft" task)


def run(config, workdir):
    return loop.run(config, workdir)


if __name__ == "__main__":
    cli.main(run)
