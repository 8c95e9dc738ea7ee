"""Text pipelines for causal language models: chat (SFT) and plain-text data to packed token rows.

    from lib.data import text
    cfg = text.default_text_config()             # config.input for an LM run
    cfg.dataset, cfg.path = "chat", "data/tulu.jsonl"
    cfg.tokenizer, cfg.max_length = "checkpoints/llama_hf", 2048
    train = text.make_text_pipeline(cfg, train=True, batch_size=8, seed=0)
    print(train.stats.summary())                 # records read, skipped by kind, truncated, fill
    it = iter(train)                             # checkpointable grain DatasetIterator
    batch = next(it)                             # dict of numpy arrays, [8, 2048] each

Datasets (``cfg.dataset``):

=================== ===============================================================================
``chat``            JSONL / JSON / Parquet records with a ``messages`` list of ``{role, content}``
                    (open-instruct / Tulu / MFT format); loss on the assistant turns only
``text``            JSONL / JSON / Parquet records with a ``text`` field, or ``.txt`` files (one
                    document each); loss on every token
``arithmetic``      built in, no files: arithmetic question/answer conversations from a seed
``arithmetic_text`` the same problems as plain text (``"12 + 7 = 19"``)
=================== ===============================================================================

``cfg.path`` is a file, a directory (its ``.jsonl/.json/.parquet/.txt`` files, sorted), a glob or
a comma-separated list of these. The eval split is ``cfg.eval_path``, or else the last
``cfg.eval_holdout`` records of ``cfg.path`` (then never trained on).

Examples. A chat record becomes the ids of its rendered conversation (the tokenizer's chat
template, encoded without added special tokens, as transformers does) and a 0/1 mask of the
assistant tokens (:func:`lib.text.chat.assistant_mask`: by rendering prefixes). A text document
becomes its ids with the tokenizer's special tokens (e.g. a BOS) and, with ``add_eos``, the EOS
token; every token is a target.

Bad records are counted by kind and skipped, never silently: ``malformed``, ``unknown_role``,
``no_assistant``, ``template_error``, ``template_mismatch``, ``empty_mask`` (from
:mod:`lib.text.chat`), ``too_long`` (more than ``max_length`` tokens with ``truncate=False``),
``too_short`` (fewer than 2 tokens: nothing to predict), ``truncated_empty`` (truncation cut every
assistant token). With ``truncate=True`` long examples are cut to ``max_length`` and counted as
``truncated``; text documents are instead split into ``max_length`` pieces with
``split_documents=True`` (the default), counted as ``split``. :attr:`TextPipeline.stats` holds the
counts (:meth:`TextStats.as_dict`, :meth:`TextStats.summary`), logged when a pipeline is built.

Rows. With ``pack=True`` examples are packed first-fit (in a seeded random order for training,
file order for eval) into rows of ``max_length`` tokens; otherwise one example per row. Both give
the same keys, so the model has one code path:

=============== ======= ===========================================================================
``input_ids``   int32   ``[B, T]`` tokens; the pad id (0 if the tokenizer has none) after the last
``targets``     int32   ``[B, T]`` the next token of the same segment: ``input_ids[b, t + 1]``,
                        pad where ``t + 1`` is in another segment or padding
``loss_mask``   float32 ``[B, T]`` 1 where ``targets[b, t]`` is trained on: same segment and (chat)
                        an assistant token; 0 across segment boundaries and on padding
``segment_ids`` int32   ``[B, T]`` 0 for padding, 1, 2, ... for the examples of a row
``positions``   int32   ``[B, T]`` position within the segment (0 at each segment start)
``valid``       float32 ``[B]`` eval only: 0 for the all-padding rows that fill the last batch
=============== ======= ===========================================================================

Attention must be causal within a segment and never cross segments (``segment_ids`` equal and
non-zero). The loss is ``sum(nll * loss_mask) / sum(loss_mask)``.

Determinism and resume. Each process tokenises only its strided shard (records ``p, p + P, ...``),
eagerly when the pipeline is built (the counts are known before training; memory is about 5 bytes
a token; about 2000 conversations a second for a Tulu-style template on one core, so set
``cache_dir`` for large sets: a rerun then loads the tokenised shard). Rows are packed once (their composition is fixed), then shuffled each epoch by grain with
a seed derived from ``(seed, process)``; the batch stream is a pure function of the config, the
data, the seed and the position, so a restored iterator state (``it.get_state()`` /
``it.set_state()``, or grain's orbax checkpoint handler) resumes on exactly the batches an
uninterrupted run sees. Processes may hold different numbers of rows: training repeats forever,
and eval pads every process to the same number of batches (agreed across real JAX processes).
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict

from lib.data import pipeline as pipeline_lib
from lib.data.pipeline import VALID_KEY, DataSpec, Pipeline, _get
from lib.text import chat
from lib.text.tokenizer import Tokenizer, byte_tokenizer

log = logging.getLogger(__name__)

TEXT_DATASETS = ("chat", "text", "arithmetic", "arithmetic_text")
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")

# Skips (the record is not used) and notes (it is used, altered), as counted in TextStats.
SKIP_KINDS = ("malformed", "unknown_role", "no_assistant", "template_error", "template_mismatch", "empty_mask",
              "too_long", "too_short", "truncated_empty")


def abstract_batch(rows: int, length: int, sharding=None) -> dict:
    """What the text pipeline yields for ``rows`` x ``length`` tokens, as ``jax.ShapeDtypeStruct``s
    carrying ``sharding``: the batch argument for ahead-of-time compilation of a language-model step."""
    import jax
    return {k: jax.ShapeDtypeStruct((rows, length), np.float32 if k == "loss_mask" else np.int32, sharding=sharding)
            for k in BATCH_KEYS}


def default_text_config() -> ml_collections.ConfigDict:
    """The ``input`` section of a language-model config (the built-in arithmetic chats by default)."""
    return ml_collections.ConfigDict(dict(
        dataset="arithmetic",                      # "chat" | "text" | "arithmetic" | "arithmetic_text"
        path=config_dict.placeholder(str),         # train data: file, directory, glob, or comma-separated list
        eval_path=config_dict.placeholder(str),    # eval data; None: the last eval_holdout records of path
        eval_holdout=0,
        tokenizer=config_dict.placeholder(str),    # HF tokenizer directory, "bytes" (built-in), or None: passed in
        max_length=512,                            # tokens per row (T)
        pack=True,                                 # several examples per row (segment ids) or one, padded
        truncate=False,                            # cut examples over max_length (counted) instead of skipping them
        split_documents=True,                      # text: cut long documents into max_length pieces (counted)
        add_eos=True,                              # text: end each document with the EOS token
        messages_key="messages",
        text_key="text",
        roles=("system", "user", "assistant"),     # other roles: the record is skipped (unknown_role)
        last_turn_only=False,                      # chat: train on the last assistant turn only
        max_segments=0,                            # packing: at most this many examples a row (0: no limit)
        num_examples=2000,                         # arithmetic: train conversations
        num_eval_examples=200,                     # arithmetic: eval conversations (disjoint problems)
        cache_dir=config_dict.placeholder(str),    # keep tokenised shards here (keyed by content): reruns skip tokenising
        shuffle=True,
        num_workers=0,
        num_threads=2,
        prefetch=4,
    ))


def is_text_config(cfg: Any) -> bool:
    """Whether an ``input`` config names a text dataset (vs an image one)."""
    return _get(cfg, "dataset") in TEXT_DATASETS


def validate_text_config(cfg: Any, *, batch_size: int | None = None, check_path: bool = True) -> None:
    """Raise a clear error for a text config that cannot work, before any data is read
    (``check_path=False``: the caller supplies the records)."""
    kind = _get(cfg, "dataset")
    if kind not in TEXT_DATASETS:
        raise ValueError(f"input.dataset must be one of {TEXT_DATASETS} for text, got {kind!r}")
    if check_path and kind in ("chat", "text") and not _get(cfg, "path"):
        raise ValueError(f"dataset={kind!r} needs input.path: a .jsonl/.json/.parquet/.txt file, a directory "
                         f"or a glob")
    max_length = _get(cfg, "max_length")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f"input.max_length must be an int >= 2, got {max_length!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size <= 0):
        raise ValueError(f"batch_size (per process) must be a positive int, got {batch_size!r}")
    if int(_get(cfg, "eval_holdout", 0) or 0) < 0 or int(_get(cfg, "max_segments", 0) or 0) < 0:
        raise ValueError("input.eval_holdout and input.max_segments must be >= 0")


# --------------------------------------------------------------------------- built-in data

def arithmetic_conversations(num: int, seed: int = 0, *, max_operand: int = 99, turns: Sequence[float] = (0.7, 0.3),
                             system_rate: float = 0.3) -> list[dict[str, Any]]:
    """``num`` distinct conversations ``{"messages": [...]}`` asking for sums, differences and
    products, with an optional system prompt and one or two question/answer turns (probabilities
    ``turns``); the answer is the number. Deterministic in ``seed``; distinct seeds may overlap,
    so take train and eval from one call (:func:`make_text_pipeline` does)."""
    rng = np.random.default_rng(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    words = {"+": "plus", "-": "minus", "*": "times"}
    out, seen = [], set()
    while len(out) < num:
        messages = []
        if rng.random() < system_rate:
            messages.append({"role": "system", "content": "You are a calculator. Answer with the number only."})
        n_turns = 1 + int(rng.choice(len(turns), p=np.asarray(turns) / np.sum(turns)))
        value = int(rng.integers(0, max_operand + 1))
        for t in range(n_turns):
            op = str(rng.choice(list(ops)))
            b = int(rng.integers(0, max_operand + 1))
            question = (f"What is {value} {op} {b}?" if t == 0 else f"And {words[op]} {b}?")
            value = ops[op](value, b)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": str(value)}]
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            out.append({"messages": messages})
    return out


def arithmetic_texts(num: int, seed: int = 0, **kwargs: Any) -> list[dict[str, str]]:
    """The same problems as :func:`arithmetic_conversations`, as plain-text records ``{"text": "12 + 7 = 19"}``
    (follow-up turns continue the expression: ``"12 + 7 = 19, * 2 = 38"``)."""
    out = []
    for conv in arithmetic_conversations(num, seed, **kwargs):
        parts = []
        for m in conv["messages"]:
            if m["role"] == "user":
                q = m["content"].rstrip("?")
                if q.startswith("What is "):
                    parts.append(q[len("What is "):])
                else:
                    word, b = q[len("And "):].split()
                    parts.append({"plus": "+", "minus": "-", "times": "*"}[word] + " " + b)
            elif m["role"] == "assistant":
                parts[-1] += f" = {m['content']}"
        out.append({"text": ", ".join(parts)})
    return out


def write_jsonl(records: Sequence[Any], path: str | os.PathLike) -> Path:
    """Write records one JSON object a line (e.g. :func:`arithmetic_conversations` for a demo)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------- reading files

def list_files(path: str | os.PathLike | Sequence[str]) -> list[Path]:
    """The data files ``path`` names: files, directories (their data files, sorted, recursively),
    globs, or a comma-separated string / list of these. Raises if none is found."""
    specs = path.split(",") if isinstance(path, str) else [str(path)] if isinstance(path, os.PathLike) else list(path)
    files: list[Path] = []
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_EXTENSIONS
                           and not f.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"directory {p} holds no {'/'.join(FILE_EXTENSIONS)} files")
            files += found
        elif p.is_file():
            files.append(p)
        elif any(c in spec for c in "*?["):
            found = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
            if not found:
                raise FileNotFoundError(f"no file matches {spec!r}")
            files += found
        else:
            raise FileNotFoundError(f"data path {spec!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no data files in {path!r}")
    for f in files:
        if f.suffix not in FILE_EXTENSIONS:
            raise ValueError(f"{f}: unsupported data file type {f.suffix!r} (expected one of {FILE_EXTENSIONS})")
    return files


class _JsonLine(bytes):
    """One undecoded JSONL line (decoded only by the process whose shard holds it)."""


def read_records(files: Sequence[Path], *, field: str) -> list[Any]:
    """Every record of ``files`` in order: a JSONL line (undecoded), a JSON list's items, a
    Parquet column ``field``'s values, or a ``.txt`` file's whole text."""
    records: list[Any] = []
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                records += [_JsonLine(line) for line in fh if line.strip()]
        elif f.suffix == ".json":
            data = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{f}: a .json data file must hold a list of records (use .jsonl for one a line)")
            records += data
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq
            schema = pq.read_schema(f)
            if field not in schema.names:
                raise ValueError(f"{f}: no column {field!r} (columns: {schema.names})")
            records += [{field: v} for v in pq.read_table(f, columns=[field]).column(field).to_pylist()]
        elif f.suffix == ".txt":
            records.append({field: f.read_text(encoding="utf-8")})
    return records


def _field(record: Any, field: str, *, plain_text: bool) -> Any:
    """The record's ``field`` (decoding a JSONL line; a bare string is a text document when
    ``plain_text``); raises MalformedMessagesError."""
    if isinstance(record, _JsonLine):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as e:
            raise chat.MalformedMessagesError(f"invalid JSON line: {e}") from e
    if isinstance(record, str) and plain_text:
        return record
    if not isinstance(record, dict) or field not in record:
        raise chat.MalformedMessagesError(f"record has no {field!r} field: {str(record)[:80]!r}")
    return record[field]


# --------------------------------------------------------------------------- examples

@dataclasses.dataclass
class TextStats:
    """What building one pipeline did to its records (this process's shard)."""

    dataset: str
    split: str
    process_index: int
    process_count: int
    records: int = 0              # read in this shard
    examples: int = 0             # kept (a split document counts once per piece)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)   # kind -> records
    truncated: int = 0            # cut to max_length (truncate=True)
    split_documents: int = 0      # text documents cut into pieces
    tokens: int = 0               # in the kept examples
    loss_tokens: int = 0          # targets with loss_mask 1
    rows: int = 0
    max_length: int = 0

    @property
    def fill(self) -> float:
        """Fraction of row positions holding tokens."""
        return self.tokens / max(1, self.rows * self.max_length)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "skipped_total": sum(self.skipped.values()), "fill": self.fill}

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.dataset} {self.split} (process {self.process_index}/{self.process_count}): "
                f"{self.records} records -> {self.examples} examples; skipped {sum(self.skipped.values())} "
                f"({skipped}); truncated {self.truncated}; split {self.split_documents}; {self.tokens} tokens, "
                f"{self.loss_tokens} in the loss ({self.loss_tokens / max(1, self.tokens):.1%}); {self.rows} rows "
                f"of {self.max_length} ({self.fill:.1%} filled)")


@dataclasses.dataclass
class Examples:
    """Tokenised examples, flat: example ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` and its
    per-token mask (1: a target when it is the next token) ``mask[...]`` alike."""

    tokens: np.ndarray    # int32
    mask: np.ndarray      # uint8
    offsets: np.ndarray   # int64 [n + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_list(cls, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> Examples:
        lengths = np.fromiter((len(ids) for ids, _ in items), np.int64, len(items))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate([ids for ids, _ in items]).astype(np.int32) if items else np.zeros(0, np.int32)
        mask = np.concatenate([m for _, m in items]).astype(np.uint8) if items else np.zeros(0, np.uint8)
        return cls(tokens, mask, offsets)


def tokenize_records(records: Sequence[Any], tokenizer: Tokenizer, cfg: Any, stats: TextStats, *,
                     chunk: int = 512) -> Examples:
    """Records -> examples (module docstring), counting skips, truncations and splits in ``stats``."""
    kind = _get(cfg, "dataset")
    is_chat = kind in ("chat", "arithmetic")
    max_length = int(_get(cfg, "max_length"))
    truncate = bool(_get(cfg, "truncate", False))
    split_docs = bool(_get(cfg, "split_documents", True)) and not is_chat
    skipped: Counter = Counter()
    items: list[tuple[np.ndarray, np.ndarray]] = []
    eos = tokenizer.eos_id if bool(_get(cfg, "add_eos", True)) else None

    def keep(ids: np.ndarray, mask: np.ndarray) -> None:
        if len(ids) > max_length:
            if split_docs:
                stats.split_documents += 1
                for s in range(0, len(ids), max_length):
                    if len(ids) - s >= 2:
                        items.append((ids[s:s + max_length], mask[s:s + max_length]))
                return
            if not truncate:
                skipped["too_long"] += 1
                return
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated += 1
            if is_chat and not mask[1:].any():
                skipped["truncated_empty"] += 1
                return
        if len(ids) < 2:
            skipped["too_short"] += 1
        elif is_chat and not mask[1:].any():   # the first token is never a target
            skipped["empty_mask"] += 1
        else:
            items.append((ids, mask))

    field = _get(cfg, "messages_key", "messages") if is_chat else _get(cfg, "text_key", "text")
    for start in range(0, len(records), chunk):
        values = []
        for record in records[start:start + chunk]:
            try:
                values.append(_field(record, field, plain_text=not is_chat))
            except chat.ChatError as e:
                skipped[e.kind] += 1
        if is_chat:
            results = chat.assistant_masks(tokenizer, values, last_only=bool(_get(cfg, "last_turn_only", False)),
                                           roles=tuple(_get(cfg, "roles", chat.ROLES)))
            for r in results:
                if isinstance(r, chat.ChatError):
                    skipped[r.kind] += 1
                else:
                    keep(*r)
        else:
            texts = []
            for v in values:
                if isinstance(v, str):
                    texts.append(v)
                else:
                    skipped["malformed"] += 1
            for ids in tokenizer.encode_batch(texts, add_special_tokens=True):
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = ids + [eos]
                ids = np.asarray(ids, np.int32)
                keep(ids, np.ones(len(ids), np.uint8))
    stats.records += len(records)
    stats.skipped = dict(sorted((Counter(stats.skipped) + skipped).items()))
    examples = Examples.from_list(items)
    stats.examples = len(examples)
    stats.tokens = int(len(examples.tokens))
    # Targets in the loss: each example's mask without its first token.
    stats.loss_tokens = int(examples.mask.sum() - examples.mask[examples.offsets[:-1]].sum()) if len(examples) else 0
    return examples


# Config fields that change what tokenize_records produces (the cache key holds them).
_TOKENIZE_FIELDS = ("dataset", "max_length", "truncate", "split_documents", "add_eos", "messages_key", "text_key",
                    "roles", "last_turn_only")


def _cache_key(records: Sequence[Any], tokenizer: Tokenizer, cfg: Any) -> str:
    """A digest of everything tokenisation depends on: the records' content, the tokenizer
    (vocabulary, pipeline, special tokens, template) and the config fields that matter."""
    import hashlib
    h = hashlib.sha256()
    h.update(json.dumps({k: _get(cfg, k) for k in _TOKENIZE_FIELDS}, sort_keys=True, default=list).encode())
    h.update(tokenizer.backend.to_str().encode())
    h.update(json.dumps([tokenizer.special_tokens_map, tokenizer.chat_template], sort_keys=True).encode())
    for r in records:
        h.update(bytes(r) if isinstance(r, _JsonLine) else json.dumps(r, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def tokenize_cached(records: Sequence[Any], tokenizer: Tokenizer, cfg: Any, stats: TextStats) -> Examples:
    """:func:`tokenize_records`, through ``cfg.cache_dir`` when set: the examples and counts of a
    shard are stored under a digest of the records, tokenizer and config, so a rerun (a restart,
    the next experiment) skips tokenisation. A changed record, tokenizer or setting is a new entry."""
    cache_dir = _get(cfg, "cache_dir")
    if not cache_dir:
        return tokenize_records(records, tokenizer, cfg, stats)
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"tokens-{_cache_key(records, tokenizer, cfg)}.npz"
    counts = ("records", "examples", "skipped", "truncated", "split_documents", "tokens", "loss_tokens")
    if path.is_file():
        with np.load(path) as z:
            saved = json.loads(str(z["stats"]))
            for k in counts:
                setattr(stats, k, saved[k])
            log.info("tokenised examples from the cache %s", path)
            return Examples(z["tokens"], z["mask"], z["offsets"])
    examples = tokenize_records(records, tokenizer, cfg, stats)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, tokens=examples.tokens, mask=examples.mask, offsets=examples.offsets,
             stats=json.dumps({k: getattr(stats, k) for k in counts}))
    os.replace(tmp, path)
    return examples


# --------------------------------------------------------------------------- packing and rows

def pack_first_fit(lengths: np.ndarray, capacity: int, order: np.ndarray | None = None, *,
                   max_segments: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """First-fit packing of examples (taken in ``order``) into rows of ``capacity`` tokens.

    Returns ``(row_ptr, members)``: row ``r`` holds examples ``members[row_ptr[r]:row_ptr[r + 1]]``
    in the order they were placed. ``max_segments`` > 0 caps the examples a row holds."""
    lengths = np.asarray(lengths, np.int64)
    order = np.arange(len(lengths)) if order is None else np.asarray(order)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit rows of {capacity}")
    smallest = int(lengths.min()) if len(lengths) else 1
    rows: list[list[int]] = []
    free = np.zeros(0, np.int64)          # remaining space of the open rows
    open_rows = np.zeros(0, np.int64)     # their index in ``rows``
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(free >= n)
        if len(fits):
            k = fits[0]
            r = int(open_rows[k])
            rows[r].append(int(i))
            free[k] -= n
            if free[k] < smallest or (max_segments and len(rows[r]) >= max_segments):
                free, open_rows = np.delete(free, k), np.delete(open_rows, k)
        else:
            rows.append([int(i)])
            if capacity - n >= smallest and max_segments != 1:
                free, open_rows = np.append(free, capacity - n), np.append(open_rows, len(rows) - 1)
    row_ptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    members = np.fromiter((i for r in rows for i in r), np.int64, int(row_ptr[-1]))
    return row_ptr, members


def build_row(examples: Examples, members: Sequence[int], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of ``length`` tokens holding ``members`` as segments 1, 2, ... (batch keys of the module docstring)."""
    input_ids = np.full(length, pad_id, np.int32)
    segment_ids = np.zeros(length, np.int32)
    positions = np.zeros(length, np.int32)
    token_mask = np.zeros(length, np.uint8)
    cur = 0
    for seg, i in enumerate(members, start=1):
        s, e = int(examples.offsets[i]), int(examples.offsets[i + 1])
        n = e - s
        input_ids[cur:cur + n] = examples.tokens[s:e]
        token_mask[cur:cur + n] = examples.mask[s:e]
        segment_ids[cur:cur + n] = seg
        positions[cur:cur + n] = np.arange(n, dtype=np.int32)
        cur += n
    same = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] > 0)
    targets = np.full(length, pad_id, np.int32)
    targets[:-1] = np.where(same, input_ids[1:], pad_id)
    loss_mask = np.zeros(length, np.float32)
    loss_mask[:-1] = same & (token_mask[1:] > 0)
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
            "positions": positions}


class RowSource:
    """Random-access rows: ``len(src)`` and ``src[r]`` -> the batch keys for row ``r`` (one example, or packed)."""

    def __init__(self, examples: Examples, row_ptr: np.ndarray, members: np.ndarray, length: int, pad_id: int):
        self.examples, self.row_ptr, self.members = examples, row_ptr, members
        self.length, self.pad_id = length, pad_id

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        members = self.members[self.row_ptr[r]:self.row_ptr[r + 1]]
        return build_row(self.examples, members, self.length, self.pad_id)

    def __repr__(self) -> str:
        return f"RowSource(rows={len(self)}, examples={len(self.examples)}, length={self.length})"


# --------------------------------------------------------------------------- pipelines

class TextPipeline(Pipeline):
    """A :class:`lib.data.pipeline.Pipeline` of token rows, with the tokenizer and the record counts."""

    def __init__(self, dataset: grain.IterDataset, spec: DataSpec, *, train: bool, stats: TextStats,
                 tokenizer: Tokenizer, rows: RowSource):
        super().__init__(dataset, spec, train=train)
        self.stats, self.tokenizer, self.rows = stats, tokenizer, rows

    def __repr__(self) -> str:
        return f"TextPipeline(train={self.train}, {self.spec}; {self.stats.summary()})"


def get_tokenizer(cfg: Any, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """``tokenizer`` if given, else the one ``cfg.tokenizer`` names ("bytes": :func:`byte_tokenizer`)."""
    if tokenizer is not None:
        return tokenizer
    name = _get(cfg, "tokenizer")
    if name == "bytes":
        return byte_tokenizer()
    if name and str(name).endswith(".gguf"):   # the tokenizer a GGUF file carries in its metadata
        from lib.models.llama import gguf
        tok, special = gguf.GGUFCheckpoint(name).tokenizer_parts()
        return Tokenizer(tok, special)
    if name:
        from lib import hub
        return Tokenizer.from_pretrained(hub.resolve(name))   # a directory, or a cached hub id
    raise ValueError("a text pipeline needs a tokenizer: pass tokenizer=... (e.g. the model's) or set "
                     "input.tokenizer to an HF tokenizer directory (or 'bytes' for the built-in byte tokenizer)")


def load_split(cfg: Any, *, train: bool) -> list[Any]:
    """Every record of the train or eval split (not yet sharded)."""
    kind = _get(cfg, "dataset")
    holdout = int(_get(cfg, "eval_holdout", 0) or 0)
    if kind in ("arithmetic", "arithmetic_text"):
        n_train, n_eval = int(_get(cfg, "num_examples", 2000)), int(_get(cfg, "num_eval_examples", 200))
        make = arithmetic_conversations if kind == "arithmetic" else arithmetic_texts
        records = make(n_train + n_eval, seed=0)   # one stream: train and eval problems are disjoint
        return records[:n_train] if train else records[n_train:]
    field = _get(cfg, "messages_key", "messages") if kind == "chat" else _get(cfg, "text_key", "text")
    if train or not _get(cfg, "eval_path"):
        records = read_records(list_files(_get(cfg, "path")), field=field)
        if not train and not holdout:
            raise ValueError("no eval data: set input.eval_path, or input.eval_holdout to hold out the last records "
                             "of input.path")
        if holdout >= len(records):
            raise ValueError(f"input.eval_holdout={holdout} leaves no training records (of {len(records)})")
        return records[:len(records) - holdout] if train else records[len(records) - holdout:]
    return read_records(list_files(_get(cfg, "eval_path")), field=field)


def _agree_on_max(value: int, process_count: int) -> int:
    """The largest ``value`` over the JAX processes (only when they really are ``process_count``)."""
    if process_count <= 1:
        return value
    import jax
    if jax.process_count() != process_count:   # simulated processes (tests): nothing to agree with
        return value
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _mark_valid(row: dict[str, np.ndarray]) -> dict[str, Any]:
    return {**row, VALID_KEY: np.float32(1.0)}


def make_text_pipeline(cfg: Any, *, train: bool, batch_size: int, seed: int, tokenizer: Tokenizer | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       records: Sequence[Any] | None = None) -> TextPipeline:
    """Build the train (infinite, shuffled rows) or eval (one padded pass) text pipeline.

    Args:
      cfg: the ``input`` config (:func:`default_text_config`); attribute or dict access.
      train: training pipeline if True, evaluation otherwise.
      batch_size: rows per batch *in this process*.
      seed: packing order and row shuffling (train only).
      tokenizer: the model's :class:`~lib.text.Tokenizer`; default: the one ``cfg.tokenizer`` names.
      process_index, process_count: this process's shard; default ``jax.process_index()`` / ``jax.process_count()``.
      records: the whole split's records (dicts with the messages / text field, or strings for
        text) instead of the ones ``cfg`` names.

    Returns a :class:`TextPipeline` (batch keys in the module docstring); its ``stats`` counts what
    happened to the records and is logged here.
    """
    validate_text_config(cfg, batch_size=batch_size, check_path=records is None)
    tokenizer = get_tokenizer(cfg, tokenizer)
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if records is None:
        records = load_split(cfg, train=train)
    shard = list(records[process_index::process_count])
    max_length = int(_get(cfg, "max_length"))
    stats = TextStats(dataset=_get(cfg, "dataset"), split="train" if train else "eval", process_index=process_index,
                      process_count=process_count, max_length=max_length)
    examples = tokenize_cached(shard, tokenizer, cfg, stats)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    pseed = pipeline_lib._process_seed(seed, process_index)

    if _get(cfg, "pack", True):
        order = np.random.default_rng(pseed).permutation(len(examples)) if train else None
        row_ptr, members = pack_first_fit(examples.lengths, max_length, order,
                                          max_segments=int(_get(cfg, "max_segments", 0) or 0))
    else:
        row_ptr, members = np.arange(len(examples) + 1, dtype=np.int64), np.arange(len(examples), dtype=np.int64)
    rows = RowSource(examples, row_ptr, members, max_length, pad_id)
    stats.rows = len(rows)
    # Skipped or altered records are never silent: a warning, not only an info line.
    (log.warning if stats.skipped or stats.truncated else log.info)("%s", stats.summary())

    ds = grain.MapDataset.source(rows)
    if train:
        if len(rows) < batch_size:
            raise ValueError(f"{stats.summary()}: fewer rows than one batch of {batch_size}")
        ds = ds.seed(pseed)
        if _get(cfg, "shuffle", True):
            ds = ds.shuffle()
        ds = ds.batch(batch_size, drop_remainder=True).repeat()
        spec = DataSpec(num_examples=len(rows), batch_size=batch_size, steps_per_epoch=len(rows) // batch_size,
                        num_classes=None, process_index=process_index, process_count=process_count)
        return TextPipeline(pipeline_lib._finish(ds, cfg), spec, train=True, stats=stats, tokenizer=tokenizer,
                            rows=rows)

    ds = ds.map(_mark_valid)
    num_batches = _agree_on_max(math.ceil(len(rows) / batch_size), process_count)
    num_padding = num_batches * batch_size - len(rows)
    if num_padding:
        pad = {k: np.zeros_like(v) for k, v in _mark_valid(build_row(examples, [], max_length, pad_id)).items()}
        pad["input_ids"][:] = pad["targets"][:] = pad_id
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source(pipeline_lib._Constant(pad, num_padding))])
    ds = ds.batch(batch_size, drop_remainder=False)
    spec = DataSpec(num_examples=len(rows), batch_size=batch_size, steps_per_epoch=num_batches, num_classes=None,
                    process_index=process_index, process_count=process_count)
    return TextPipeline(pipeline_lib._finish(ds, cfg), spec, train=False, stats=stats, tokenizer=tokenizer, rows=rows)
