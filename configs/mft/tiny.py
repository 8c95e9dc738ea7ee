"""The MFT pipeline on the tiny HF checkpoint of the golden fixtures (the ``runlocal`` recipe):
FFT -> MFT -> bake and export, on the built-in arithmetic chats, in about a minute on a CPU.

    python -m projects.mft.pipeline --config configs/mft/tiny.py --workdir /tmp/mft_tiny
"""
from pathlib import Path

from configs import common

TINY_HF = str(Path(__file__).resolve().parents[3] / "shared" / "golden" / "checkpoints" / "llama_tiny_hf")


def get_config(arg=None):
    arg = common.parse_arg(arg, stage="fft", init_from="", layers="1", keep=0.9, steps=20)
    layers = tuple(int(i) for i in str(arg.layers).split("-"))
    c = common.mft_config(stage=arg.stage, layers=layers, keep=arg.keep, model="llama_tiny_mha",
                          init_from=arg.init_from or TINY_HF, tokenizer=TINY_HF, dataset="arithmetic",
                          max_length=96, batch_size=8, epochs=1, lr=3e-3 if arg.stage == "fft" else 1e-2,
                          warmup_ratio=0.1)
    c.input.num_examples, c.input.num_eval_examples = 400, 64
    c.total_steps, c.log_every, c.checkpoint_every = arg.steps, 5, 0
    return c
