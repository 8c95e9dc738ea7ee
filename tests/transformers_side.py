"""Run in a separate interpreter that has torch + transformers (never imported by the suite):

    python tests/transformers_side.py HF_DIR INPUT.npy OUTPUT.npy [GENERATE.json]

Loads HF_DIR with ``AutoModelForCausalLM`` / ``AutoTokenizer`` exactly as a user would, writes the
float32 logits of the token ids in INPUT.npy, and (optionally) greedy-decodes a chat prompt.
"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path, inp, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
model.eval()
ids = torch.from_numpy(np.load(inp).astype(np.int64))
with torch.no_grad():
    np.save(out, model(input_ids=ids).logits.float().numpy())
if len(sys.argv) > 4:
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    json.dump({"prompt_ids": enc["input_ids"][0].tolist(), "new_ids": gen[0, enc["input_ids"].shape[1]:].tolist(),
               "text": tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)},
              open(sys.argv[4], "w"))
