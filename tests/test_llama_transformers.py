"""Our HF export, loaded by transformers itself (in its own interpreter, given by
``STARJAX_TORCH_PYTHON``: a Python with torch and transformers, see benchmarks/README.md): the
same logits as our model, and for SmolLM2 the same greedy chat answer and prompt ids."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lib.models import llama
from lib.models.llama import generate

TORCH_PYTHON = os.environ.get("STARJAX_TORCH_PYTHON")
pytestmark = pytest.mark.skipif(not TORCH_PYTHON, reason="STARJAX_TORCH_PYTHON (torch + transformers) not set")
SIDE = Path(__file__).with_name("transformers_side.py")


def transformers_logits(directory, ids, tmp_path, chat=False):
    np.save(tmp_path / "ids.npy", ids)
    args = [TORCH_PYTHON, str(SIDE), str(directory), str(tmp_path / "ids.npy"), str(tmp_path / "logits.npy")]
    if chat:
        args.append(str(tmp_path / "gen.json"))
    subprocess.run(args, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    gen = json.loads((tmp_path / "gen.json").read_text()) if chat else None
    return np.load(tmp_path / "logits.npy"), gen


def test_transformers_loads_our_export_of_the_tiny_model(golden_dir, tmp_path):
    model, tok = llama.from_pretrained(golden_dir / "checkpoints" / "llama_tiny_hf")
    out = llama.export_hf(model, tmp_path / "export", tok, dtype="float32", max_shard_bytes=200_000)
    ids = np.random.default_rng(0).integers(0, 320, (2, 24))
    theirs, _ = transformers_logits(out, ids, tmp_path)
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=2e-5 * max(1, np.abs(theirs).max()))


def test_transformers_loads_our_export_of_smollm2(tmp_path):
    from configs.llama.sft import smollm2_gguf
    model, tok = llama.from_pretrained(smollm2_gguf())
    out = llama.export_hf(model, tmp_path / "smollm2", tok, dtype="float32")
    ids = np.asarray([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    theirs, gen = transformers_logits(out, ids, tmp_path, chat=True)
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-4 * np.abs(theirs).max())
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True), add_special_tokens=False)
    assert prompt == gen["prompt_ids"]
    ours = generate.generate(model, [prompt], max_new_tokens=12, stop_tokens=tok.stop_ids)
    n = len(gen["new_ids"])
    assert ours.tokens[0, :n].tolist() == gen["new_ids"], (tok.decode(ours.sequences()[0]), gen["text"])
    assert "Paris" in gen["text"]
