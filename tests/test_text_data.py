"""lib.data.text: chat/text records -> packed (or padded) token rows, bad-record counts, shards, resume.

Small data and the byte / golden tokenizers: no JAX compile, a few seconds in all."""
import json

import numpy as np
import pytest

from lib.data import text
from lib.text import Tokenizer, byte_tokenizer


@pytest.fixture(scope="module")
def tok(golden_dir):
    return Tokenizer.from_pretrained(golden_dir / "checkpoints" / "llama_tiny_hf")


def cfg_of(**overrides):
    cfg = text.default_text_config()
    cfg.num_examples, cfg.num_eval_examples, cfg.max_length = 96, 24, 64
    cfg.update(overrides)
    return cfg


def make(cfg, tok, *, train=True, batch_size=4, seed=0, p=0, n=1, **kw):
    return text.make_text_pipeline(cfg, train=train, batch_size=batch_size, seed=seed, tokenizer=tok,
                                   process_index=p, process_count=n, **kw)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def check_row_invariants(batch, pad_id):
    """What every row must satisfy, packed or not."""
    ids, tgt, lm, seg, pos = (batch[k] for k in text.BATCH_KEYS)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            same = seg[b, t] > 0 and seg[b, t + 1] == seg[b, t]
            assert tgt[b, t] == (ids[b, t + 1] if same else pad_id)
            assert lm[b, t] == 0 or same
            if same:
                assert pos[b, t + 1] == pos[b, t] + 1
            elif seg[b, t + 1] > 0:
                assert pos[b, t + 1] == 0 and seg[b, t + 1] == seg[b, t] + 1
        assert lm[b, -1] == 0 and tgt[b, -1] == pad_id
        n = int((seg[b] > 0).sum())   # the segments fill a prefix of the row, numbered from 1; padding after
        assert (seg[b, :n] > 0).all() and (n == 0 or seg[b, 0] == 1) and (ids[b, n:] == pad_id).all()
        assert (np.diff(seg[b, :n]) >= 0).all() and lm[b, n - 1:].sum() == 0


def test_build_row_shifts_targets_within_segments_only():
    ex = text.Examples.from_list([(np.array([10, 11, 12], np.int32), np.array([0, 1, 1], np.uint8)),
                                  (np.array([20, 21], np.int32), np.array([0, 1], np.uint8))])
    row = text.build_row(ex, [0, 1], 8, pad_id=3)
    np.testing.assert_array_equal(row["input_ids"], [10, 11, 12, 20, 21, 3, 3, 3])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"], [11, 12, 3, 21, 3, 3, 3, 3])
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 0, 0, 0, 0])   # mask[t + 1], never across
    assert {k: v.dtype.name for k, v in row.items()} == {
        "input_ids": "int32", "targets": "int32", "loss_mask": "float32", "segment_ids": "int32",
        "positions": "int32"}


def test_first_fit_packing_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, size=300)
    for max_segments in (0, 3):
        ptr, members = text.pack_first_fit(lengths, 64, rng.permutation(300), max_segments=max_segments)
        assert sorted(members) == list(range(300))
        per_row = np.add.reduceat(lengths[members], ptr[:-1])
        assert per_row.max() <= 64
        if max_segments:
            assert np.diff(ptr).max() <= max_segments
    assert per_row.sum() / (64 * len(per_row)) > 0.8 or max_segments
    ptr, members = text.pack_first_fit(lengths, 64)
    assert np.add.reduceat(lengths[members], ptr[:-1]).mean() > 0.9 * 64   # first-fit fills rows well
    with pytest.raises(ValueError, match="does not fit"):
        text.pack_first_fit([65], 64)


def test_chat_loss_mask_is_the_assistant_mask_shifted(tok):
    conv = text.arithmetic_conversations(5, seed=1)
    pipe = make(cfg_of(pack=False, max_length=128), tok, train=False, batch_size=5, records=conv)
    assert pipe.stats.examples == 5
    batch = next(iter(pipe))
    for b, record in enumerate(conv):
        ids, mask = tok.assistant_mask(record["messages"])
        n = len(ids)
        np.testing.assert_array_equal(batch["input_ids"][b, :n], ids)
        np.testing.assert_array_equal(batch["loss_mask"][b, :n - 1], mask[1:])
        np.testing.assert_array_equal(batch["targets"][b, :n - 1], ids[1:])
        assert batch["loss_mask"][b, n - 1:].sum() == 0 and (batch["segment_ids"][b] == (np.arange(128) < n)).all()
    check_row_invariants(batch, tok.pad_id)
    assert pipe.stats.loss_tokens == int(batch["loss_mask"].sum())


def test_bad_records_are_counted_by_kind_and_reported(tok, tmp_path, caplog):
    good = text.arithmetic_conversations(6, seed=2)
    user = {"role": "user", "content": "hi"}
    long = {"messages": [user, {"role": "assistant", "content": "word " * 200}]}
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"messages": [user]}),                                            # no_assistant
        json.dumps({"messages": [user, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "4"}]}),
        "{not json",                                                                 # malformed
        json.dumps({"text": "no messages field"}),                                   # malformed
        json.dumps(long),                                                            # too_long
        json.dumps({"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "4"}]}),
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pipe = make(cfg_of(dataset="chat", path=str(path), eval_holdout=2), tok, train=True, batch_size=1)
    stats = pipe.stats
    assert stats.records == 10 and stats.examples == 6     # eval_holdout: the last 2 records are eval
    assert stats.skipped == {"malformed": 2, "no_assistant": 1, "unknown_role": 1}
    ev = make(cfg_of(dataset="chat", path=str(path), eval_holdout=2), tok, train=False, batch_size=1)
    assert ev.stats.skipped == {"too_long": 2} and ev.stats.examples == 0 and len(ev) == 0
    # Truncation is a choice, and counted: the long answer is cut (kept), the long question leaves no answer.
    ev = make(cfg_of(dataset="chat", path=str(path), eval_holdout=2, truncate=True), tok, train=False, batch_size=1)
    assert ev.stats.truncated == 2 and ev.stats.skipped == {"truncated_empty": 1} and ev.stats.examples == 1
    summary = ev.stats.summary()
    assert "2 records -> 1 examples" in summary and "truncated_empty 1" in summary and "truncated 2" in summary
    assert any(r.levelname == "WARNING" and "truncated_empty 1" in r.getMessage() for r in caplog.records)
    d = ev.stats.as_dict()
    assert d["skipped_total"] == 1 and d["skipped"] == {"truncated_empty": 1} and 0 < d["fill"] <= 1


def test_parquet_jsonl_and_records_give_the_same_rows(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    conv = text.arithmetic_conversations(20, seed=3)
    text.write_jsonl(conv, tmp_path / "a.jsonl")
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps(conv))
    runs = [list(make(cfg_of(dataset="chat", path=str(tmp_path / f), eval_path=str(tmp_path / f)), tok,
                      train=False)) for f in ("a.jsonl", "b.parquet", "c.json")]
    runs.append(list(make(cfg_of(dataset="chat"), tok, train=False, records=conv)))
    for other in runs[1:]:
        assert_batches_equal(runs[0], other)
    both = make(cfg_of(dataset="chat", path=f"{tmp_path}/a.jsonl,{tmp_path}/*.parquet"), tok)
    assert both.stats.records == 40


def test_plain_text_documents_split_and_end_with_eos(tok, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "long.txt").write_text("the quick brown fox jumps over the lazy dog. " * 12)
    text.write_jsonl([{"text": "two plus two is four"}, {"text": 7}], tmp_path / "docs" / "short.jsonl")
    cfg = cfg_of(dataset="text", path=str(tmp_path / "docs"), eval_path=str(tmp_path / "docs"))
    pipe = make(cfg, tok, train=False, batch_size=2)
    stats = pipe.stats
    assert stats.records == 3 and stats.split_documents == 1 and stats.skipped == {"malformed": 1}
    batches = list(pipe)
    rows = [r for b in batches for r in range(2) if b["valid"][r]]
    assert len(rows) == stats.rows
    ids = np.concatenate([b["input_ids"] for b in batches])
    seg = np.concatenate([b["segment_ids"] for b in batches])
    lm = np.concatenate([b["loss_mask"] for b in batches])
    # Every document starts with the BOS (post-processor) and ends with an EOS; every next token is a target.
    assert (ids == tok.bos_id).sum() == 2 and (ids == tok.eos_id).sum() == 2 and seg.max() >= 1
    assert lm.sum() == stats.loss_tokens == stats.tokens - stats.examples
    # Splitting keeps every token of the long document (pieces of at most max_length).
    long_ids = tok.encode("the quick brown fox jumps over the lazy dog. " * 12) + [tok.eos_id]
    assert stats.tokens == len(long_ids) + len(tok.encode("two plus two is four")) + 1
    # Without splitting the long document is skipped (counted), or truncated when asked.
    cfg.split_documents = False
    assert make(cfg, tok, train=False).stats.skipped == {"malformed": 1, "too_long": 1}
    cfg.truncate = True
    assert make(cfg, tok, train=False).stats.truncated == 1


def test_packed_and_padded_rows_have_the_same_keys_and_invariants(tok):
    for pack in (True, False):
        pipe = make(cfg_of(pack=pack), tok, batch_size=8)
        batch = next(iter(pipe))
        assert set(batch) == set(text.BATCH_KEYS)
        assert all(batch[k].shape == (8, 64) for k in text.BATCH_KEYS)
        check_row_invariants(batch, tok.pad_id)
        segments = batch["segment_ids"].max(axis=1)
        assert segments.mean() > 1.5 if pack else (segments == 1).all()
    packed, padded = make(cfg_of(pack=True), tok), make(cfg_of(pack=False), tok)
    assert packed.stats.examples == padded.stats.examples == padded.stats.rows > 1.5 * packed.stats.rows
    assert packed.stats.fill > 0.85


def test_resume_from_iterator_state_gives_identical_batches(tok):
    cfg = cfg_of()
    pipe = make(cfg, tok, batch_size=4, seed=1)
    assert pipe.steps_per_epoch == pipe.stats.rows // 4
    it = iter(pipe)
    take(it, 3)
    state = it.get_state()
    uninterrupted = take(it, 2 * pipe.steps_per_epoch)   # across an epoch boundary
    resumed = iter(make(cfg, tok, batch_size=4, seed=1))
    resumed.set_state(state)
    assert_batches_equal(uninterrupted, take(resumed, len(uninterrupted)))
    # Same seed, same stream; another seed, another order; each epoch reshuffles the rows.
    again = take(iter(make(cfg, tok, batch_size=4, seed=1)), 2)
    other = take(iter(make(cfg, tok, batch_size=4, seed=2)), 2)
    first = take(iter(pipe), 1)[0]
    assert_batches_equal(again[:1], [first])
    assert not np.array_equal(other[0]["input_ids"], first["input_ids"])
    epoch = take(iter(pipe), 2 * pipe.steps_per_epoch)
    a = np.concatenate([b["input_ids"] for b in epoch[:pipe.steps_per_epoch]])
    b = np.concatenate([b["input_ids"] for b in epoch[pipe.steps_per_epoch:]])
    rows = {bytes(pipe.rows[r]["input_ids"]) for r in range(len(pipe.rows))}
    assert not np.array_equal(a, b)
    for ep in (a, b):   # each epoch: distinct rows of the (fixed) packed rows, minus the dropped remainder
        assert len(set(map(bytes, ep))) == len(ep) and set(map(bytes, ep)) <= rows


def test_process_shards_are_disjoint_and_cover_the_split():
    tok = byte_tokenizer()
    docs = [f"document number {i}" for i in range(21)]
    cfg = cfg_of(dataset="text", max_length=32)
    seen = []
    for p in range(2):
        pipe = make(cfg, tok, train=False, batch_size=4, p=p, n=2, records=docs)
        assert pipe.stats.records == (11, 10)[p]
        found = set()
        for batch in pipe:
            for b in np.flatnonzero(batch["valid"]):
                for s in range(1, batch["segment_ids"][b].max() + 1):
                    found.add(tok.decode(batch["input_ids"][b][batch["segment_ids"][b] == s], skip_special_tokens=True))
        seen.append(found)
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(docs)
    train = [make(cfg, tok, batch_size=2, p=p, n=2, records=docs) for p in range(2)]
    assert [t.stats.records for t in train] == [11, 10]


def test_eval_pass_is_ordered_padded_and_repeatable(tok):
    cfg = cfg_of(pack=False)
    pipe = make(cfg, tok, train=False, batch_size=5)
    batches = list(pipe)
    assert len(batches) == len(pipe) == -(-pipe.stats.rows // 5)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == pipe.stats.rows and (valid[pipe.stats.rows:] == 0).all()
    last = batches[-1]
    pad_rows = last["valid"] == 0
    assert (last["segment_ids"][pad_rows] == 0).all() and (last["loss_mask"][pad_rows] == 0).all()
    assert (last["input_ids"][pad_rows] == tok.pad_id).all()
    assert_batches_equal(batches, list(pipe))
    # Eval rows follow the file order: the first row is the first eval conversation.
    first = text.arithmetic_conversations(120)[96]
    ids, _ = tok.assistant_mask(first["messages"])
    np.testing.assert_array_equal(batches[0]["input_ids"][0, :len(ids)], ids)


def test_config_checks_and_tokenizer_choice(tok, tmp_path):
    with pytest.raises(ValueError, match="needs input.path"):
        make(cfg_of(dataset="chat"), tok)
    with pytest.raises(ValueError, match="max_length"):
        make(cfg_of(max_length=1), tok)
    with pytest.raises(ValueError, match="one of"):
        make(cfg_of(dataset="digits"), tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make(cfg_of(dataset="chat", path=str(tmp_path / "nope.jsonl")), tok)
    text.write_jsonl(text.arithmetic_conversations(4), tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="no eval data"):
        make(cfg_of(dataset="chat", path=str(tmp_path / "x.jsonl")), tok, train=False)
    with pytest.raises(ValueError, match="fewer rows than one batch"):
        make(cfg_of(dataset="chat", path=str(tmp_path / "x.jsonl")), tok, batch_size=64)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        text.make_text_pipeline(cfg_of(), train=True, batch_size=2, seed=0, process_index=0, process_count=1)
    pipe = text.make_text_pipeline(cfg_of(tokenizer="bytes", max_length=128), train=True, batch_size=2, seed=0, process_index=0,
                                   process_count=1)
    assert pipe.tokenizer.vocab_size == 263 and text.is_text_config(cfg_of()) and not text.is_text_config(
        {"dataset": "digits"})
    assert text.make_text_pipeline({**cfg_of().to_dict(), "tokenizer": "bytes", "max_length": 128}, train=False, batch_size=2, seed=0,
                                   process_index=0, process_count=1).stats.examples == 24   # plain dicts work too


def test_arithmetic_generator_is_deterministic_and_correct():
    a, b = text.arithmetic_conversations(50, seed=7), text.arithmetic_conversations(50, seed=7)
    assert a == b and len({json.dumps(x) for x in a}) == 50
    for conv in a:
        m = conv["messages"]
        assert m[-1]["role"] == "assistant" and {x["role"] for x in m} <= {"system", "user", "assistant"}
    texts = text.arithmetic_texts(50, seed=7)
    for t in texts:
        for expr in t["text"].split(", ")[:1]:
            lhs, rhs = expr.split(" = ")
            assert eval(lhs) == int(rhs)   # noqa: S307 (digits and + - * only)


def test_the_generic_data_entry_points_dispatch_text_configs():
    # lib.data.make_source / make_pipeline / validate_config, as the training loop calls them.
    from lib import data
    cfg = cfg_of(tokenizer="bytes", max_length=128)
    data.pipeline.validate_config(cfg, batch_size=4)
    with pytest.raises(ValueError, match="needs input.path"):
        data.pipeline.validate_config(cfg_of(dataset="chat"), batch_size=4)
    records = data.make_source(cfg, data.pipeline.split_of(cfg, train=False))
    assert records == text.arithmetic_conversations(120)[96:]
    pipe = data.make_pipeline(cfg, train=False, batch_size=4, seed=0, process_index=0, process_count=1,
                              source=records)
    assert isinstance(pipe, text.TextPipeline) and pipe.stats.records == 24
    train = data.make_pipeline(cfg, train=True, batch_size=4, seed=0, process_index=0, process_count=1)
    assert set(next(iter(train))) == set(text.BATCH_KEYS) and train.stats.records == 96


def test_tokenised_shards_are_cached_by_content(tok, tmp_path):
    conv = text.arithmetic_conversations(30, seed=4) + [{"messages": [{"role": "user", "content": "x"}]}]
    cfg = cfg_of(dataset="chat", cache_dir=str(tmp_path / "cache"))
    first = make(cfg, tok, train=False, records=conv)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1
    again = make(cfg, tok, train=False, records=conv)       # from the cache: same rows, same counts
    assert_batches_equal(list(first), list(again))
    assert again.stats.as_dict() == first.stats.as_dict() and again.stats.skipped["no_assistant"] == 1
    uncached = make(cfg_of(dataset="chat"), tok, train=False, records=conv)
    assert_batches_equal(list(first), list(uncached))
    conv[0] = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    make(cfg, tok, train=False, records=conv)                # another record: another entry
    cfg.max_length = 100                                     # another setting: another entry
    make(cfg, tok, train=False, records=conv)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 3
