"""lib.text: the HF tokenizer wrapper, chat templates rendered as transformers does, assistant masks.

No JAX here: tokenizers + jinja2 only, all in well under a second."""
import json

import jinja2
import numpy as np
import pytest
import tokenizers

from lib.text import chat
from lib.text.tokenizer import Tokenizer, TokenizerError, VocabularyMismatchError, byte_tokenizer


@pytest.fixture(scope="module")
def hf_dir(golden_dir):
    return golden_dir / "checkpoints" / "llama_tiny_hf"


@pytest.fixture(scope="module")
def tok(hf_dir):
    return Tokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def example(hf_dir):
    return json.loads((hf_dir / "chat_example.json").read_text())


def test_golden_conversation_renders_and_tokenises_as_the_reference(tok, example):
    text = tok.apply_chat_template(example["messages"], add_generation_prompt=example["add_generation_prompt"])
    assert text == example["text"]
    # transformers' apply_chat_template(tokenize=True) encodes without added special tokens ...
    assert tok.apply_chat_template(example["messages"], add_generation_prompt=True, tokenize=True) == \
        example["input_ids"]
    # ... and the tokenizer's post-processor adds the BOS otherwise.
    assert tok.encode(text) == example["input_ids_with_special_tokens"]
    assert [tok.id_to_token(i) for i in example["input_ids"]] == example["tokens"]
    assert {t: tok.token_to_id(t) for t in example["special_tokens"]} == example["special_tokens"]
    assert tok.decode(example["input_ids"], skip_special_tokens=False) == example["text"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 3, 0)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.vocab_size == len(tok) == 320 and tok.stop_ids == (2,) and tok.model_max_length == 128


def test_golden_conversation_assistant_mask(tok, example):
    ids, mask = tok.assistant_mask(example["messages"])
    # Rendered without a generation prompt: the reference ids minus the trailing "<|assistant|>\n".
    np.testing.assert_array_equal(ids, example["input_ids"][:-2])
    assert ids.dtype == np.int32 and mask.dtype == np.uint8 and len(mask) == len(ids)
    # Exactly the assistant content and its end-of-turn token: "F o u r . </s>", not the header or the "\n" after.
    expected = np.zeros(len(ids), np.uint8)
    start = example["tokens"].index("<|assistant|>") + 2
    expected[start:start + 6] = 1
    np.testing.assert_array_equal(mask, expected)
    assert [example["tokens"][i] for i in np.flatnonzero(mask)] == ["F", "o", "u", "r", ".", "</s>"]


def test_every_assistant_turn_is_masked_and_last_only(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]
    ids, mask = chat.assistant_mask(tok, messages)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == "<|user|>\nHi\n<|assistant|>\nHello there</s>\n<|user|>\nBye\n<|assistant|>\nSee you</s>"
    # The masked tokens decode to the two replies, each with its end-of-turn token.
    runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    assert [tok.decode(ids[r], skip_special_tokens=False) for r in runs] == ["Hello there</s>", "See you</s>"]
    ids2, last = chat.assistant_mask(tok, messages, last_only=True)
    np.testing.assert_array_equal(ids2, ids)
    assert tok.decode(ids[last.astype(bool)], skip_special_tokens=False) == "See you</s>"


def test_bad_records_raise_their_kind(tok):
    user = {"role": "user", "content": "2+2?"}
    cases = [
        ([user], chat.NoAssistantError, "no_assistant"),
        ([user, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}], chat.UnknownRoleError,
         "unknown_role"),
        ([user, {"role": "assistant"}], chat.MalformedMessagesError, "malformed"),
        ([user, {"role": "assistant", "content": 4}], chat.MalformedMessagesError, "malformed"),
        ([], chat.MalformedMessagesError, "malformed"),
        ("hello", chat.MalformedMessagesError, "malformed"),
    ]
    for messages, error, kind in cases:
        with pytest.raises(error) as info:
            tok.assistant_mask(messages)
        assert info.value.kind == kind and isinstance(info.value, chat.ChatError) and isinstance(info.value, ValueError)
    # A template's raise_exception raises jinja2's TemplateError in render (as transformers) ...
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}ok"
    with pytest.raises(jinja2.TemplateError, match="must start with user"):
        chat.render([{"role": "assistant", "content": "x"}], strict)
    # ... and a counted ChatTemplateError when building masks.
    with pytest.raises(chat.ChatTemplateError) as info:
        tok.assistant_mask([{"role": "assistant", "content": "x"}], chat_template=strict)
    assert info.value.kind == "template_error"
    # A template that rewrites earlier turns (drops their reasoning) cannot be masked by prefixes.
    rewrites = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}|{% endfor %}")
    messages = [user, {"role": "assistant", "content": "<think>hm</think>4"}, user,
                {"role": "assistant", "content": "4"}]
    with pytest.raises(chat.TemplateMismatchError) as info:
        tok.assistant_mask(messages, chat_template=rewrites)
    assert info.value.kind == "template_mismatch"
    # An assistant turn that renders to nothing gives an empty mask: refused, never all zeros.
    silent = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(chat.EmptyMaskError):
        tok.assistant_mask([user, {"role": "assistant", "content": "4"}], chat_template=silent)


def test_template_environment_matches_transformers():
    # trim_blocks + lstrip_blocks, loopcontrols, the generation tag, tojson without HTML escaping,
    # strftime_now and raise_exception exist; the special tokens come in as variables.
    template = ("{{ bos_token }}\n"
                "{% for m in messages %}\n"
                "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
                "{% generation %}{{ m | tojson }}{% endgeneration %}\n"
                "{% endfor %}\n"
                "{% if add_generation_prompt %}{{ strftime_now('%Y') | length }}{% endif %}")
    messages = [{"role": "user", "content": "<b>é</b> & \"q\""}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "never"}]
    out = chat.render(messages, template, add_generation_prompt=True, bos_token="<s>")
    # (trim_blocks eats the newline after each block tag, lstrip_blocks the indent before one)
    assert out == ('<s>\n{"role": "user", "content": "<b>é</b> & \\"q\\""}'
                   '{"role": "assistant", "content": "a"}4')
    assert chat.render([], "{{ x | tojson(indent=2) }}", x={"a": [1]}) == '{\n  "a": [\n    1\n  ]\n}'
    # Sandboxed: unsafe attribute access is refused.
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat.render([], "{{ ''.__class__.__mro__ }}")


def test_chatml_template_masks_im_end(tmp_path):
    tok = byte_tokenizer(special_tokens=("<unk>", "<|im_start|>", "<|im_end|>", "<pad>"),
                         chat_template=chat.CHATML_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo?"},
                {"role": "assistant", "content": "Hï"}]
    ids, mask = tok.assistant_mask(messages)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == chat.render(messages, chat.CHATML_TEMPLATE)
    # Multi-byte characters: the offsets still line up with the rendered text.
    assert tok.decode(ids[mask.astype(bool)], skip_special_tokens=False) == "Hï<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHéllo?<|im_end|>\n<|im_start|>assistant\n")


def test_save_and_reload_round_trip(tok, hf_dir, tmp_path):
    tok.save(tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    # What transformers' AutoTokenizer needs: a fast class, the special tokens, the template.
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == \
        ("<s>", "</s>", "<pad>", "<unk>")
    assert config["chat_template"] == tok.chat_template and config["model_max_length"] == 128
    assert config["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>"]
    again = Tokenizer.from_pretrained(tmp_path / "out")
    texts = ["Hello world!", "  two\nlines ", "<|user|>\nx</s>", "ünïcödé 123"]
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert json.loads(again.backend.to_str()) == json.loads(tokenizers.Tokenizer.from_file(
        str(hf_dir / "tokenizer.json")).to_str())
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template)
    assert not list((tmp_path / "out").glob(".*.tmp"))  # no temporary files left behind
    # A stale chat_template.jinja (newer transformers' layout) would win on loading: it is kept in step.
    (tmp_path / "out" / "chat_template.jinja").write_text("stale")
    again.chat_template = chat.CHATML_TEMPLATE
    again.save(tmp_path / "out")
    assert Tokenizer.from_pretrained(tmp_path / "out").chat_template == chat.CHATML_TEMPLATE


def test_built_from_a_tokenizers_object_and_ids_as_the_gguf_reader_does(hf_dir):
    backend = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = Tokenizer(backend, {"bos_token_id": 1, "eos_token_id": 2, "chat_template": chat.TULU_TEMPLATE},
                    generation_config={"eos_token_id": [2, 6], "pad_token_id": 3})
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", None)
    assert tok.stop_ids == (2, 6)
    assert tok.to_config()["bos_token"] == "<s>" and "bos_token_id" not in tok.to_config()
    with pytest.raises(TokenizerError, match="not in the tokenizer's vocabulary"):
        Tokenizer(backend, {"eos_token": "<|eot|>"})
    with pytest.raises(TokenizerError, match="999"):
        Tokenizer(backend, {"eos_token_id": 999})
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(backend, {}).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(hf_dir / "missing")


def test_check_fits_the_model_vocabulary(tok):
    tok.check_fits(320)
    tok.check_fits(512)            # a padded embedding is fine
    with pytest.raises(VocabularyMismatchError, match=r"ids up to 319 but the model's vocabulary has 300 rows: 20 "):
        tok.check_fits(300)


def test_batch_encode_decode_and_the_byte_tokenizer():
    tok = byte_tokenizer()
    texts = ["héllo wörld", "a\n\tb  c", "日本"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts] and all(ids[0] == tok.bos_id for ids in batch)
    assert tok.decode_batch(batch, skip_special_tokens=True) == texts
    assert tok.decode(batch[0]) == "<s>" + texts[0]   # transformers' default keeps special tokens
    assert tok.vocab_size == 7 + 256 and len(tok.encode("日本", add_special_tokens=False)) == 6
    ids, mask = tok.assistant_mask([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}])
    assert tok.decode(ids[mask.astype(bool)], skip_special_tokens=False) == "2</s>"
    # Streaming: multi-byte characters come out whole, once complete; the pieces add up to the text.
    step = tok.decode_stream()
    pieces = [step(i) for i in tok.encode("héllo 日本")]
    assert "".join(pieces) == "héllo 日本" and "é" in pieces and "" in pieces


def test_against_transformers_where_installed(tok, hf_dir, example, tmp_path):
    """transformers is not a dependency; where it is installed (checked with 5.25.0, without torch),
    our render, ids, masks and saved files agree with AutoTokenizer's."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "saved")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n"
                "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}\n{% else %}<|{{ m['role'] }}|>\n"
                "{{ m['content'] | tojson }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    conv = [{"role": "system", "content": "Be <brief> & \"kind\" é"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you"}]
    for path in (hf_dir, tmp_path / "saved"):
        hf = transformers.AutoTokenizer.from_pretrained(path)
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (1, 2, 3, 320)
        for text in ["Hello world!", "  two\nlines ", "ünïcödé 123", example["text"]]:
            assert hf(text)["input_ids"] == tok.encode(text)
            assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
        for messages in (example["messages"], conv):
            for gen in (False, True):
                assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                    tok.apply_chat_template(messages, add_generation_prompt=gen)
        # With {% generation %} tags transformers can mask too: prefix rendering gives the same mask.
        out = hf.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, mask = tok.assistant_mask(conv, chat_template=template)
        assert list(out["input_ids"]) == ids.tolist() and list(out["assistant_masks"]) == mask.tolist()
