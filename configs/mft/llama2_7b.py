"""Mask Fine-Tuning's LLaMA2-7B recipes (upstream bash/training/run_{fft,local_masktune}_llama2-7b_*.sh).

AdamW lr 2e-5, linear schedule with 3% warmup, no weight decay, 2 epochs, 128 sequences of 4096
tokens per step, bfloat16 compute, Tulu chat template (the tokenizer's), loss on assistant tokens,
FSDP over every device. MFT masks 10% of each of the seven projections of four layers per domain:
math 4-7, coding 20-23, instruction following 0-3.

    # 1. full fine-tuning
    python -m projects.mft.train --config configs/mft/llama2_7b.py:domain=coding,stage=fft,init_from=/ckpt/llama2-7b-hf \\
        --config.input.path=/data/coding.jsonl --workdir /runs/fft
    python -m projects.mft.export --config configs/mft/llama2_7b.py:domain=coding,stage=fft,init_from=/ckpt/llama2-7b-hf \\
        --workdir /runs/fft --out /ckpt/fft_hf
    # 2. MFT from the FFT weights, 3. bake and export (dense HF checkpoint + masks.safetensors)
    python -m projects.mft.train --config configs/mft/llama2_7b.py:domain=coding,stage=mft,init_from=/ckpt/fft_hf \\
        --config.input.path=/data/coding.jsonl --workdir /runs/mft
    python -m projects.mft.export --config configs/mft/llama2_7b.py:domain=coding,stage=mft,init_from=/ckpt/fft_hf \\
        --workdir /runs/mft --out /ckpt/mft_hf
"""
from configs import common

LAYERS = {"math": (4, 5, 6, 7), "coding": (20, 21, 22, 23), "if": (0, 1, 2, 3)}


def get_config(arg=None):
    arg = common.parse_arg(arg, domain="coding", stage="mft", init_from="", model="llama2_7b")
    if arg.domain not in LAYERS:
        raise ValueError(f"domain={arg.domain!r}: expected one of {sorted(LAYERS)}")
    c = common.mft_config(stage=arg.stage, layers=LAYERS[arg.domain], keep=0.9, model=arg.model,
                          init_from=arg.init_from or None, dataset="chat", max_length=4096, batch_size=128, epochs=2,
                          lr=2e-5, warmup_ratio=0.03, compute_dtype="bfloat16", fsdp=True)
    c.input.pack = False            # open-instruct pads one conversation per row (no packing)
    c.input.truncate = True         # and truncates at max_seq_length
    c.log_every, c.checkpoint_every = 10, 200
    return c
