"""A Hugging Face fast tokenizer (``tokenizer.json``) without transformers: the ``tokenizers``
library for the text <-> ids mapping, the HF config files for the special tokens and chat template.

    from lib.text import Tokenizer
    tok = Tokenizer.from_pretrained("path/to/hf_dir")     # tokenizer.json + tokenizer_config.json ...
    ids = tok.encode("Hello")                             # post-processor applied (e.g. BOS prepended)
    text = tok.apply_chat_template(messages, add_generation_prompt=True)   # as transformers renders it
    ids, mask = tok.assistant_mask(messages)              # tokens + 0/1 "assistant token" mask
    tok.check_fits(model_vocab_size)                      # one clear error if ids exceed the model
    tok.save("out_dir")                                   # loadable by transformers' AutoTokenizer

What is read from an HF directory (each file optional except ``tokenizer.json``):

* ``tokenizer.json``: the tokenizers pipeline (normalizer, pre-tokenizer, model, post-processor,
  decoder, added tokens);
* ``tokenizer_config.json``: ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` (strings,
  or ``{"content": ...}`` AddedToken dicts), ``chat_template``, ``model_max_length``;
* ``special_tokens_map.json``: special tokens the config lacks (older exports keep them here);
* ``chat_template.jinja`` / ``chat_template.json``: the template where newer transformers saves it
  (wins over the config's, as in transformers);
* ``generation_config.json``: ``eos_token_id`` (an int or a list) adds stop ids; a ``pad_token_id``
  is used when the config names no pad token.

The GGUF reader builds a ``tokenizers.Tokenizer`` from a file's vocabulary and merges and calls
``Tokenizer(tok, config)`` with a ``tokenizer_config.json``-style dict (token strings, or
``bos_token_id``-style ids, and ``chat_template``).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

SPECIAL_NAMES = ("bos", "eos", "pad", "unk")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be used as asked (missing files, a special token not in the vocabulary)."""


class VocabularyMismatchError(TokenizerError):
    """The tokenizer produces ids the model has no embedding row for."""


def _token_content(value: Any) -> str | None:
    """A special token as written in HF configs: a string, an AddedToken dict, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"cannot read a special token from {value!r} (expected a string or {{'content': ...}})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory (never half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the HF special tokens, chat template and generation stop ids.

    Args:
      tokenizer: the ``tokenizers.Tokenizer`` (from ``tokenizer.json``, or built by the GGUF reader).
      config: a ``tokenizer_config.json``-style dict: ``bos_token`` / ``eos_token`` / ``pad_token`` /
        ``unk_token`` (strings or ``{"content": ...}``), or ``bos_token_id``-style ids instead;
        ``chat_template``; ``model_max_length``. Other keys are kept and written back by :meth:`save`.
      generation_config: a ``generation_config.json`` dict: its ``eos_token_id`` (int or list)
        extends :attr:`stop_ids`; its ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id`` fill
        special tokens the config does not name.

    Raises :class:`TokenizerError` when a named special token is not in the vocabulary.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None, *,
                 generation_config: Mapping[str, Any] | None = None):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self._vocab_size: int | None = None
        self.config: dict[str, Any] = dict(config or {})
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        self._special: dict[str, str | None] = {}
        for name in SPECIAL_NAMES:
            token = _token_content(self.config.get(f"{name}_token"))
            if token is None:
                token_id = self.config.get(f"{name}_token_id")
                if token_id is None and name != "unk":
                    token_id = self.generation_config.get(f"{name}_token_id")
                    if isinstance(token_id, (list, tuple)):
                        token_id = token_id[0] if token_id else None
                if token_id is not None:
                    token = tokenizer.id_to_token(int(token_id))
                    if token is None:
                        raise TokenizerError(f"{name}_token_id {token_id} is not in the vocabulary "
                                             f"({self.vocab_size} ids)")
            if token is not None and tokenizer.token_to_id(token) is None:
                raise TokenizerError(f"{name}_token {token!r} is not in the tokenizer's vocabulary")
            self._special[name] = token

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load an HF tokenizer directory (see the module docstring for the files read)."""
        directory = Path(directory).expanduser()
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            what = "directory" if directory.is_dir() else "path (not a directory)"
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}: expected a Hugging Face tokenizer "
                                    f"{what} holding {TOKENIZER_FILE} (and tokenizer_config.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception with a parse message
            raise TokenizerError(f"could not read {path}: {e}") from e
        config = _read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
        if (directory / SPECIAL_TOKENS_FILE).is_file():
            for key, value in _read_json(directory / SPECIAL_TOKENS_FILE).items():
                config.setdefault(key, value)
        # Newer transformers saves the template beside the config; it wins, as in transformers.
        if (directory / "chat_template.jinja").is_file():
            config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif (directory / "chat_template.json").is_file():
            config["chat_template"] = _read_json(directory / "chat_template.json").get("chat_template")
        gen = (_read_json(directory / GENERATION_CONFIG_FILE)
               if (directory / GENERATION_CONFIG_FILE).is_file() else None)
        return cls(tok, config, generation_config=gen)

    def to_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` this tokenizer saves: the config it was given, with the
        special tokens as strings, the chat template, and the fast-tokenizer class."""
        config = {k: v for k, v in self.config.items()
                  if not (k.endswith("_token_id") and k[:-len("_token_id")] in SPECIAL_NAMES)}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        for name in SPECIAL_NAMES:
            config[f"{name}_token"] = self._special[name]
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
        ``special_tokens_map.json``: what transformers' ``AutoTokenizer.from_pretrained`` reads.
        Each file is written whole or not at all; the directory is created if missing."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        config = self.to_config()
        special_map = {f"{n}_token": self._special[n] for n in SPECIAL_NAMES if self._special[n] is not None}
        extra = config.get("additional_special_tokens")
        if extra:
            special_map["additional_special_tokens"] = [_token_content(t) for t in extra]
        _atomic_write(directory / TOKENIZER_FILE, self._tok.to_str(pretty=True))
        _atomic_write(directory / SPECIAL_TOKENS_FILE, json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
        _atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        # A template file there would win over the config's on loading: keep it in step, never stale.
        if (directory / "chat_template.jinja").exists() and self.chat_template is not None:
            _atomic_write(directory / "chat_template.jinja", self.chat_template)

    # ------------------------------------------------------------------ special tokens

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def _id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self._tok.token_to_id(token)

    bos_token = property(lambda self: self._special["bos"])
    eos_token = property(lambda self: self._special["eos"])
    pad_token = property(lambda self: self._special["pad"])
    unk_token = property(lambda self: self._special["unk"])
    bos_id = property(lambda self: self._id("bos"))
    eos_id = property(lambda self: self._id("eos"))
    pad_id = property(lambda self: self._id("pad"))
    unk_id = property(lambda self: self._id("unk"))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the EOS token and every ``eos_token_id`` of the generation config."""
        ids = [] if self.eos_id is None else [self.eos_id]
        gen = self.generation_config.get("eos_token_id")
        for i in (gen if isinstance(gen, (list, tuple)) else [] if gen is None else [gen]):
            if int(i) not in ids:
                ids.append(int(i))
        return tuple(ids)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """What transformers passes to a chat template besides the messages (``bos_token``, ...)."""
        out: dict[str, Any] = {f"{n}_token": self._special[n] for n in SPECIAL_NAMES if self._special[n] is not None}
        extra = self.config.get("additional_special_tokens")
        if extra:
            out["additional_special_tokens"] = [_token_content(t) for t in extra]
        return out

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] (named templates)
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self.config["chat_template"] = template

    @property
    def model_max_length(self) -> int | None:
        value = self.config.get("model_max_length")
        return int(value) if isinstance(value, (int, float)) and value < 1e20 else None

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (added tokens included): the embedding rows a model needs."""
        if self._vocab_size is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def check_fits(self, vocab_size: int) -> None:
        """Raise :class:`VocabularyMismatchError` if any id this tokenizer can produce is
        ``>= vocab_size`` (the model's embedding rows). A model with more rows is fine (padding)."""
        if self.vocab_size > int(vocab_size):
            vocab = self._tok.get_vocab(with_added_tokens=True)
            over = sorted((i, t) for t, i in vocab.items() if i >= vocab_size)
            shown = ", ".join(f"{t!r}={i}" for i, t in over[:5]) + (", ..." if len(over) > 5 else "")
            raise VocabularyMismatchError(
                f"the tokenizer has ids up to {self.vocab_size - 1} but the model's vocabulary has {vocab_size} "
                f"rows: {len(over)} token(s) have no embedding ({shown}). Use the tokenizer that belongs to the "
                f"checkpoint, or resize the model's embeddings to at least {self.vocab_size}")

    # ------------------------------------------------------------------ encoding

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. a BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, texts: Sequence[str], *, add_special_tokens: bool = False
                            ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: ids int32 ``[n]`` and character offsets int64 ``[n, 2]`` into the text."""
        out = []
        for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens):
            out.append((np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2)))
        return out

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, *, skip_special_tokens: bool = True):
        """Incremental decoding for streaming generation: returns ``step(token_id) -> str``, the
        new text that token completes ("" while a multi-byte character is still incomplete)."""
        from tokenizers.decoders import DecodeStream
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)

        def step(token_id: int) -> str:
            return stream.step(self._tok, int(token_id)) or ""

        return step

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None, **kwargs: Any
                            ) -> str | list[int]:
        """Render ``messages`` as transformers' ``apply_chat_template`` does (the special tokens map
        and ``kwargs`` are the template's variables); ``tokenize=True`` returns the ids, encoded
        without special tokens (the template writes them), as transformers does."""
        from lib.text import chat
        text = chat.render(messages, self._template(chat_template), add_generation_prompt=add_generation_prompt,
                           **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def assistant_mask(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and a 0/1 mask of the assistant tokens: see :func:`lib.text.chat.assistant_mask`."""
        from lib.text import chat
        return chat.assistant_mask(self, messages, **kwargs)

    def _template(self, chat_template: str | None) -> str:
        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template'); "
                                 "pass chat_template=... or set tokenizer.chat_template")
        return template

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


def byte_tokenizer(*, special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>",
                                                         "<|assistant|>"),
                   chat_template: str | None = None) -> Tokenizer:
    """A byte-level tokenizer needing no files (demos and tests): the special tokens get ids
    ``0..k-1``, then one token per byte (256); ``<s>`` is prepended by the post-processor; the
    chat template defaults to the Tulu template (:data:`lib.text.chat.TULU_TEMPLATE`)."""
    from tokenizers import decoders, models, pre_tokenizers, processors

    from lib.text import chat

    special_tokens = list(special_tokens)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(special_tokens)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=special_tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    names = dict(zip(("unk_token", "bos_token", "eos_token", "pad_token"), special_tokens))
    if "bos_token" in names:
        bos = names["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    config = {**names, "additional_special_tokens": special_tokens[4:],
              "chat_template": chat.TULU_TEMPLATE if chat_template is None else chat_template}
    return Tokenizer(tok, config)
