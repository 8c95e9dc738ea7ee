"""Streamed merges of HF / GGUF checkpoints (lib.merge) against NumPy on tiny exported LLaMAs, and the
bad inputs that must fail before any work."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import merge, zoo
from lib.models import llama
from lib.models.llama.hf import SafetensorsSource


def random_llama(seed, name="llama_tiny_mha"):
    graphdef, state = nnx.split(zoo.create_model(name, abstract=True))
    rng = np.random.default_rng(seed)
    fill = lambda v: v.replace(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype))
    return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    dirs = [llama.export_hf(random_llama(i), root / f"m{i}", dtype="float32") for i in range(4)]
    other = llama.export_hf(random_llama(9, "llama_tiny_gqa"), root / "gqa", dtype="float32")
    return root, dirs, other


def read(d):
    src = SafetensorsSource(d)
    return {k: np.asarray(src.get(k), np.float32) for k in src.keys()}


def ties_reference(base, xs, w, density):
    """TIES per the paper / mergekit, written elementwise: trim, elect sign, disjoint weighted mean."""
    out = np.empty_like(base)
    deltas = []
    for x in xs:
        d = (x - base).reshape(-1)
        k = int(density * d.size)
        thresh = np.sort(np.abs(d))[::-1][k - 1]
        deltas.append(np.where(np.abs(d) >= thresh, d, 0.0))
    flat_out = out.reshape(-1)
    for j in range(base.size):
        vals = [wi * d[j] for wi, d in zip(w, deltas)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        num = sum(v for v in vals if np.sign(v) == sign)
        den = sum(wi for wi, v in zip(w, vals) if np.sign(v) == sign) or 1.0
        flat_out[j] = base.reshape(-1)[j] + num / den
    return out


def test_methods_match_numpy(ckpts, tmp_path):
    root, (a, b, c, base), _ = ckpts
    A, B, C, BASE = read(a), read(b), read(c), read(base)
    out = merge.merge_checkpoints([a, b, c], tmp_path / "lin", method="linear", weights=[0.2, 0.3, 0.5])
    got = read(out)
    assert set(got) == set(A)
    for k in A:
        np.testing.assert_allclose(got[k], 0.2 * A[k] + 0.3 * B[k] + 0.5 * C[k], rtol=1e-5, atol=1e-7)
    assert json.loads((out / "merge_config.json").read_text())["method"] == "linear"
    got = read(merge.merge_checkpoints([a, b], tmp_path / "uni", method="uniform"))
    for k in A:
        np.testing.assert_allclose(got[k], (A[k] + B[k]) / 2, rtol=1e-5, atol=1e-7)
    got = read(merge.merge_checkpoints([a, b], tmp_path / "ta", method="task_arithmetic", base=base,
                                       weights=[0.7, -0.4], lam=0.5))
    for k in A:
        np.testing.assert_allclose(got[k], BASE[k] + 0.5 * (0.7 * (A[k] - BASE[k]) - 0.4 * (B[k] - BASE[k])),
                                   rtol=1e-5, atol=1e-6)
    got = read(merge.merge_checkpoints([a, b, c], tmp_path / "ties", method="ties", base=base,
                                       weights=[1.0, 0.5, 0.8], density=0.4))
    for k in ("model.norm.weight", "model.layers.1.self_attn.q_proj.weight"):
        np.testing.assert_allclose(got[k], ties_reference(BASE[k], [A[k], B[k], C[k]], [1.0, 0.5, 0.8], 0.4),
                                   rtol=1e-5, atol=1e-6)
    got = read(merge.merge_checkpoints([a, b], tmp_path / "slerp", method="slerp", t=0.3))
    for k in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        v0, v1 = A[k].astype(np.float64), B[k].astype(np.float64)
        theta = np.arccos(np.sum(v0 * v1) / np.linalg.norm(v0) / np.linalg.norm(v1))
        want = (np.sin(0.7 * theta) * v0 + np.sin(0.3 * theta) * v1) / np.sin(theta)
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-6)
    same = merge.slerp(0.3, A["model.norm.weight"], 2 * A["model.norm.weight"])   # colinear: lerp
    np.testing.assert_allclose(same, 1.3 * A["model.norm.weight"], rtol=1e-6)


def test_learned_soup_baked_per_layer_and_gguf_input(ckpts, tmp_path):
    root, (a, b, _, _), _ = ckpts
    A, B = read(a), read(b)
    # a learned soup's weights: one group per model part, the stack per layer ([K, L])
    variables = {"model/embed_tokens/embedding": "embed", "model/norm/scale": "head", "lm_head/kernel": "head"}
    for leaf in ("input_layernorm/scale", "post_attention_layernorm/scale", "self_attn/q_proj/kernel",
                 "self_attn/k_proj/kernel", "self_attn/v_proj/kernel", "self_attn/o_proj/kernel",
                 "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel"):
        variables[f"model/blocks/0/layer/{leaf}"] = "stack"
    weights = {"num_experts": 2, "granularity": "layer", "variables": variables,
               "groups": {"embed": [0.9, 0.1], "head": [0.3, 0.7], "stack": [[1.0, 0.25], [0.0, 0.75]]}}
    got = read(merge.merge_checkpoints([a, b], tmp_path / "soup", method="soup", soup_weights=weights))
    np.testing.assert_allclose(got["model.embed_tokens.weight"],
                               0.9 * A["model.embed_tokens.weight"] + 0.1 * B["model.embed_tokens.weight"], rtol=1e-5)
    np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], A["model.layers.0.mlp.up_proj.weight"])
    k = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_allclose(got[k], 0.25 * A[k] + 0.75 * B[k], rtol=1e-5, atol=1e-7)
    # the merged directory loads as a LLaMA (our loader reads what transformers reads)
    model, _ = llama.from_pretrained(tmp_path / "soup")
    assert model.config.num_hidden_layers == 2
    # a GGUF input merges like its HF directory (F32 storage: exact)
    from lib.models.llama import gguf
    path = tmp_path / "a.gguf"
    gguf.write_gguf(path, llama.read_config(a), A)
    got = read(merge.merge_checkpoints([path, b], tmp_path / "from_gguf", method="linear", weights=[0.5, 0.5]))
    for key in A:
        np.testing.assert_allclose(got[key], (A[key] + B[key]) / 2, rtol=1e-6, atol=1e-7)


def test_bad_input_fails_before_any_work(ckpts, tmp_path):
    root, (a, b, c, base), other = ckpts
    with pytest.raises(merge.MergeError) as e:
        merge.merge_checkpoints([a, other], tmp_path / "x", method="linear", weights=[0.5, 0.5])
    msg = str(e.value)
    assert "num_key_value_heads" in msg and "tie_word_embeddings" in msg and "lacks tensor lm_head.weight" in msg
    assert "k_proj.weight" in msg
    with pytest.raises(merge.MergeError, match="2 weights .* for 3 models"):
        merge.merge_checkpoints([a, b, c], tmp_path / "x", method="linear", weights=[0.5, 0.5])
    with pytest.raises(merge.MergeError, match="sum to 0.9"):
        merge.merge_checkpoints([a, b], tmp_path / "x", method="linear", weights=[0.4, 0.5])
    with pytest.raises(merge.MergeError, match="exactly 2"):
        merge.merge_checkpoints([a, b, c], tmp_path / "x", method="slerp")
    with pytest.raises(merge.MergeError, match="needs a base"):
        merge.merge_checkpoints([a, b], tmp_path / "x", method="ties")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(merge.MergeError, match="not empty"):
        merge.merge_checkpoints([a, b], occupied, method="uniform")
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    with pytest.raises(merge.MergeError, match="one of the inputs"):
        merge.merge_checkpoints([a, b], a, method="uniform", overwrite=True)
    assert not (tmp_path / "x").exists()
    # different tokenizers
    from lib.text.tokenizer import Tokenizer
    import tokenizers
    for d, words in ((root / "tokA", ["a", "b"]), (root / "tokB", ["a", "c"])):
        if not d.exists():
            d.mkdir()
            for f in a.iterdir():
                (d / f.name).write_bytes(f.read_bytes())
            tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])},
                                                                   unk_token="[UNK]"))
            Tokenizer(tok).save(d)
    with pytest.raises(merge.MergeError, match="different tokenizer"):
        merge.merge_checkpoints([root / "tokA", root / "tokB"], tmp_path / "x", method="uniform")
    with pytest.raises(merge.MergeError, match="no tokenizer"):
        merge.merge_checkpoints([root / "tokA", b], tmp_path / "x", method="uniform")
    assert not (tmp_path / "x").exists()
