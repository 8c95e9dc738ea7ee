"""Held-out metrics of an exported checkpoint: token loss / accuracy on the assistant tokens of the
eval split (the training loop's evaluation), and, for chat data with short exact answers (the
built-in arithmetic), exact match of the greedy answer to the last question of each conversation,
decoded in batches with the KV cache.
"""
from __future__ import annotations

import tempfile
from pathlib import Path


from lib.data import text
from lib.models import llama
from lib.models.llama import generate
from lib.train import loop


def exact_match(model, tokenizer, conversations, *, max_new_tokens: int = 12, batch_size: int = 64) -> float:
    """Fraction of conversations whose last assistant message equals the greedy continuation of the
    conversation before it (whitespace-stripped)."""
    prompts, answers = [], []
    for conv in conversations:
        messages = conv["messages"]
        prompts.append(tokenizer.encode(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True),
                                        add_special_tokens=False))
        answers.append(messages[-1]["content"].strip())
    correct = 0
    stops = list(tokenizer.stop_ids)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        # pad the batch to a fixed size: one compiled decode loop for every chunk
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(prompts) > batch_size else chunk
        out = generate.generate(model, padded, max_new_tokens=max_new_tokens, stop_tokens=stops)
        for seq, answer in zip(out.sequences()[:len(chunk)], answers[start:start + batch_size]):
            correct += tokenizer.decode(seq, skip_special_tokens=True).strip() == answer
    return correct / max(1, len(prompts))


def evaluate_checkpoint(path: str | Path, config) -> dict:
    """``{"loss", "accuracy", "perplexity"[, "exact_match"]}`` of the HF checkpoint at ``path`` on
    ``config``'s eval split."""
    cfg = config.copy_and_resolve_references()
    cfg.task, cfg.init_from, cfg.eval_only = "causal_lm", str(path), True
    with tempfile.TemporaryDirectory() as tmp:
        metrics = loop.run(cfg, Path(tmp) / "eval")
    out = {k: metrics[k] for k in ("loss", "accuracy", "perplexity") if k in metrics}
    if cfg.input.dataset == "arithmetic":
        model, tokenizer = llama.from_pretrained(path)
        if tokenizer is None:
            tokenizer = text.get_tokenizer(cfg.input)
        out["exact_match"] = exact_match(model, tokenizer, text.load_split(cfg.input, train=False))
    return out


