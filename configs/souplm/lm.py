"""Learnable soup of K LLaMA-family experts (only the mixing weights trained) on a meta-set.

    python -m projects.souplm.train --config configs/souplm/lm.py:experts=A+B,granularity=layer \\
        --config.input.dataset=chat --config.input.path=meta.jsonl --workdir DIR
    # the tiny test model, byte tokenizer, built-in arithmetic chats (experts: weights dirs of llama_tiny_gqa)
    python -m projects.souplm.train --config configs/souplm/lm.py:runlocal,experts=E1+E2 --workdir DIR

``experts``: '+'-separated HF directories, .gguf files or zoo weights directories (the first one's
tokenizer is used unless ``tokenizer`` is given). ``granularity``: model | layer | module (matrix).
``reg_uniform`` / ``reg_entropy``: the regularised soup (``lib.soup``). The optimiser is Adam on the
alpha logits (no weight decay, constant lr, no clipping): the paper does not state it.
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, model="smollm2_135m", experts="", tokenizer="", granularity="model",
                           reg_uniform=0.0, reg_entropy=0.0, dataset="arithmetic", path="", max_length=256,
                           batch_size=8, steps=50, lr=0.05, z_loss=0.0, fsdp=False, runlocal=False)
    experts = [e for e in arg.experts.split("+") if e]
    c = common.lm_config(model=arg.model, init_from=None, dataset=arg.dataset, path=arg.path or None,
                         tokenizer=arg.tokenizer or (experts[0] if experts else None), max_length=arg.max_length,
                         batch_size=arg.batch_size, epochs=1, lr=arg.lr, warmup_ratio=0.1, fsdp=arg.fsdp)
    c.task = "soup"
    c.z_loss = arg.z_loss                      # LL3M's soupLMM trains with a 1e-3 z-loss
    c.soup = common.ml_collections.ConfigDict(dict(
        task="causal_lm", experts=experts, granularity=arg.granularity, reg_uniform=arg.reg_uniform,
        reg_entropy=arg.reg_entropy, num_experts=len(experts) or 2, mode="eval"))
    c.total_steps = arg.steps
    c.min_lr = arg.lr                          # "linear" decays to 0; keep it constant after warmup instead
    c.lr_schedule = "cosine"
    c.schedule_per_epoch = False
    c.warmup_epochs, c.wd = 0, 0.0
    c.grad_clip = None
    c.model.kwargs.remat = "full"
    if arg.runlocal:
        c.model.name, c.input.tokenizer = "llama_tiny_gqa", "bytes"
        c.input.max_length, c.input.batch_size, c.input.num_examples, c.input.num_eval_examples = 64, 8, 64, 16
        c.total_steps, c.log_every, c.checkpoint_every = 4, 2, 0
    return c
