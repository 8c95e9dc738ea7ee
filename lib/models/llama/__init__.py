"""LLaMA-family decoders (SmolLM2, LLaMA 2/3, TinyLlama, Vicuna, Tulu): HF/GGUF checkpoints in and out.

    from lib.models import llama
    model, tokenizer = llama.from_pretrained("path/to/hf_dir_or.gguf")   # or a cached hub id
    logits = model(input_ids, attention_mask)                            # [B, T, vocab], float32
    llama.export_hf(model, "out_dir", tokenizer)                         # transformers loads it

Zoo names (``lib.zoo.create_model``): ``llama_tiny_mha``, ``llama_tiny_gqa`` (test sizes),
``smollm2_135m``, ``smollm2_360m``, ``smollm2_1_7b``, ``tinyllama_1_1b``, ``llama3_2_1b``,
``llama2_7b``, ``vicuna_7b``, ``llama3_8b``. Overrides are ``config.json`` keys plus ``dtype``
(compute), ``param_dtype`` and ``remat`` ("full", "dots", "none").
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lib import zoo
from lib.models.llama.config import LlamaConfig, UnsupportedConfig, rope_inv_freq
from lib.models.llama.hf import (MappingSource, SafetensorsSource, export_hf, hf_state_dict, hf_targets,  # noqa: F401
                                 load_state_dict)
from lib.models.llama.model import LOGICAL_AXES, RULES, Llama, init_cache

__all__ = ["Llama", "LlamaConfig", "UnsupportedConfig", "from_config", "from_pretrained", "load_state_dict",
           "export_hf", "hf_state_dict", "init_cache", "RULES", "LOGICAL_AXES", "rope_inv_freq", "CONFIGS"]

_MODEL_KWARGS = ("dtype", "param_dtype", "remat")


def _dtype(d):
    return None if d is None else jnp.dtype(d)


def _build(hf_config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=None, remat: str = "full",
           **config_overrides) -> Llama:
    """The zoo factory: float32 parameters unless ``param_dtype`` says otherwise (mixed precision
    training keeps float32 master weights with ``dtype=bfloat16``)."""
    cfg = LlamaConfig.from_hf({**hf_config, **config_overrides})
    return Llama(cfg, dtype=_dtype(dtype) or jnp.dtype(jnp.float32),
                 param_dtype=_dtype(param_dtype) or jnp.dtype(jnp.float32), remat=remat, rngs=rngs)


def from_config(hf_config: Mapping[str, Any], *, rngs: int | jax.Array | nnx.Rngs = 0, dtype=None,
                param_dtype=None, remat: str = "full", mesh=None, sharding_rules=None,
                abstract: bool = False) -> Llama:
    """A randomly initialised decoder for an HF ``config.json`` dict (created sharded under ``mesh``).

    ``dtype`` is the compute dtype (``param_dtype`` defaults to it, as transformers' ``torch_dtype``);
    softmax, norms and the logits stay float32.
    """
    LlamaConfig.from_hf(hf_config)   # config errors surface here, before any tracing
    factory = functools.partial(_build, hf_config, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)
    return zoo.create_from_factory(factory, rngs=rngs, abstract=abstract, mesh=mesh,
                                   sharding_rules=sharding_rules or RULES["fsdp"], jit=True)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / "config.json" if path.is_dir() else path
    if not f.exists():
        raise FileNotFoundError(f"{path}: no config.json (an HF checkpoint directory was expected)")
    return json.loads(f.read_text())


def from_pretrained(path_or_repo: str | Path, *, dtype=None, param_dtype=None, remat: str = "full", mesh=None,
                    sharding_rules=None, strict: bool = True):
    """``(model, tokenizer)`` from an HF directory, a ``.gguf`` file or a hub repo id (from the local
    HF cache; nothing is downloaded when ``HF_HUB_OFFLINE=1``).

    The model is created abstractly (under ``mesh`` with ``sharding_rules`` when given) and filled
    tensor by tensor, so it is never whole on one host. ``tokenizer`` is None when the checkpoint
    has none.
    """
    hf_config, source, tokenizer = open_checkpoint(path_or_repo)
    model = from_config(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat, mesh=mesh,
                        sharding_rules=sharding_rules, abstract=True)
    load_state_dict(model, source, strict=strict)
    if tokenizer is not None:
        tokenizer.check_fits(model.config.vocab_size)
    return model, tokenizer


def open_checkpoint(path_or_repo: str | Path, *, tokenizer: bool = True):
    """``(hf_config, tensor source, tokenizer or None)`` for an HF directory, a ``.gguf`` file or a
    cached hub id; nothing is read into memory yet (tensors come one at a time from the source)."""
    path = Path(path_or_repo)
    if not path.exists():
        from lib import hub
        path = hub.resolve(str(path_or_repo))
    if path.suffix == ".gguf":
        from lib.models.llama import gguf
        ckpt = gguf.GGUFCheckpoint(path)
        return ckpt.config, ckpt, _tokenizer_from_gguf(ckpt) if tokenizer else None
    return read_config(path), SafetensorsSource(path), _tokenizer_from_dir(path) if tokenizer else None


def _tokenizer_from_dir(path: Path):
    if not (path / "tokenizer.json").exists():
        return None
    from lib.text.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(path)


def _tokenizer_from_gguf(ckpt):
    from lib.text.tokenizer import Tokenizer
    tok, special = ckpt.tokenizer_parts()
    return Tokenizer(tok, special)


# ------------------------------------------------------------------------------------------------
# zoo
# ------------------------------------------------------------------------------------------------
def _llama(vocab, hidden, inter, layers, heads, kv=None, *, theta=10000.0, eps=1e-5, max_pos=4096, tied=False,
           rope_scaling=None, bos=1, eos=2, head_dim=None):
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": kv or heads, "rms_norm_eps": eps,
         "rope_theta": theta, "max_position_embeddings": max_pos, "tie_word_embeddings": tied,
         "bos_token_id": bos, "eos_token_id": eos, "attention_bias": False, "mlp_bias": False}
    if rope_scaling:
        d["rope_scaling"] = rope_scaling
    if head_dim:
        d["head_dim"] = head_dim
    return d


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA3_ROPE, "factor": 32.0}

# config.json of each zoo entry (the architecture only; weights come from from_pretrained).
CONFIGS: dict[str, dict] = {
    # the golden fixtures' test sizes
    "llama_tiny_mha": _llama(320, 64, 176, 2, 4, 4, theta=1e4, max_pos=128),   # = golden llama_tiny_hf
    "llama_tiny_gqa": _llama(320, 64, 176, 2, 4, 2, theta=5e5, max_pos=128, tied=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "smollm2_135m": _llama(49152, 576, 1536, 30, 9, 3, theta=1e5, max_pos=8192, tied=True, bos=1, eos=2),
    "smollm2_360m": _llama(49152, 960, 2560, 32, 15, 5, theta=1e5, max_pos=8192, tied=True, bos=1, eos=2),
    "smollm2_1_7b": _llama(49152, 2048, 8192, 24, 32, 32, theta=1.3e5, max_pos=8192, tied=True, bos=1, eos=2),
    "tinyllama_1_1b": _llama(32000, 2048, 5632, 22, 32, 4, max_pos=2048),
    "llama3_2_1b": _llama(128256, 2048, 8192, 16, 32, 8, theta=5e5, max_pos=131072, tied=True,
                          rope_scaling=_LLAMA32_ROPE, bos=128000, eos=128001, head_dim=64),
    "llama2_7b": _llama(32000, 4096, 11008, 32, 32, 32, eps=1e-5, max_pos=4096),
    "vicuna_7b": _llama(32000, 4096, 11008, 32, 32, 32, eps=1e-5, max_pos=4096),
    "llama3_8b": _llama(128256, 4096, 14336, 32, 32, 8, theta=5e5, max_pos=8192, bos=128000, eos=128001),
}


def _factory(hf_config, *, rngs: nnx.Rngs, **overrides):
    return _build(hf_config, rngs=rngs, **overrides)


for _name, _cfg in CONFIGS.items():
    zoo.register_model(_name, functools.partial(_factory, _cfg),
                       example_input=jax.ShapeDtypeStruct((64,), jnp.int32))   # tokens, without the batch
