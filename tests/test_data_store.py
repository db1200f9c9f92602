"""Token stores: `keel data build` (formats, bad input, multi-worker equality, restartability, the CLI around
it) and reading them back (damage detection, windows across shards, out-of-range reads refused)."""

import gzip
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.data.build import BuildSpec, build_store, write_store
from keel.data.store import TokenSpace, TokenStore
from keel.errors import EXIT_CONFIG, EXIT_DATA, DataError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    lines = [json.dumps({"text": f"document number {i} " + "word " * (i % 13)}) for i in range(300)]
    bad = ["{not json", json.dumps({"body": "no text field"}), json.dumps({"text": "   "})]
    (d / "a.jsonl").write_bytes(("\n".join(lines[:150] + bad) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[150:220]) + "\n")
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines[220:]) + "\n").encode()))
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(40)] + [None]}), d / "d.parquet")
    (d / "e.txt").write_text("a plain text file is one document; <bos> here is text, not a boundary")
    (d / "f.txt").write_text("")
    return d


def _build(inputs, out, **kw):
    spec = BuildSpec(inputs=(str(inputs / "*"),), out=str(out), vocab_size=300, heldout_fraction=0.1,
                     shard_tokens=1500, **kw)
    return build_store(spec, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def store(inputs, tmp_path_factory):
    return TokenStore(_build(inputs, tmp_path_factory.mktemp("s") / "store"))


def test_all_formats_and_bad_input_counted_per_file(store, inputs):
    m = store.manifest
    assert m["inputs"]["documents"] == 300 + 40 + 1
    assert m["inputs"]["bad"] == {"malformed_json": 1, "missing_field": 2, "not_utf8": 1, "empty": 2,
                                  "unreadable": 0, "unencodable": 0}
    assert m["inputs"]["bad_by_file"][str(inputs / "a.jsonl")] == {"malformed_json": 1, "missing_field": 1,
                                                                   "not_utf8": 1, "empty": 1}
    assert m["inputs"]["bad_by_file"][str(inputs / "d.parquet")] == {"missing_field": 1}
    train, held = store.split("train"), store.split("heldout")
    assert train.n_documents + held.n_documents == 341 and held.n_documents > 0
    assert len(train.shards) > 1 and store.dtype == np.uint16
    every = np.concatenate([train.tokens(0, train.n_tokens), held.tokens(0, held.n_tokens)])
    assert (every == store.bos_id).sum() == 341  # the "<bos>" written in e.txt is text
    assert train.unigram.sum() == train.n_tokens


def test_documents_are_stored_in_pseudo_random_order(store):
    train = store.split("train")
    tok = store.tokenizer
    numbers = []
    for d in range(train.n_documents):
        text = tok.decode(train.tokens(int(train.offsets[d]), int(train.offsets[d + 1])).tolist())
        if text.startswith("document number"):
            numbers.append(int(text.split()[2]))
    assert sorted(numbers) != numbers
    assert abs(np.corrcoef(np.arange(len(numbers)), numbers)[0, 1]) < 0.2


def test_strict_names_file_and_line(inputs, tmp_path, capsys):
    code = main(["data", "build", str(inputs / "a.jsonl"), "--out", str(tmp_path / "s"), "--strict", "--jobs", "1",
                 "--vocab-size", "300", "--no-progress"])
    assert code == EXIT_DATA
    assert f"{inputs / 'a.jsonl'}:151: malformed json (--strict)" in capsys.readouterr().err


def test_multi_worker_build_equals_single_machine(store, inputs, tmp_path):
    tok = str(store.path / "tokenizer.json")
    out = tmp_path / "multi"
    common = ["data", "build", str(inputs / "*"), "--out", str(out), "--tokenizer", tok, "--heldout-fraction", "0.1",
              "--shard-tokens", "1500", "--no-progress", "--jobs", "1"]
    for stage in ("tokenize", "shard"):
        for w in range(3):
            assert main([*common, "--stage", stage, "--worker", str(w), "--workers", "3"]) == 0
        with pytest.raises(DataError, match="not a complete token store"):
            TokenStore(out)  # never looks complete before the merge
    assert main([*common, "--stage", "merge"]) == 0
    multi = TokenStore(out)
    assert multi.fingerprint == store.fingerprint
    for split in ("train", "heldout"):
        a, b = store.split(split), multi.split(split)
        assert np.array_equal(a.tokens(0, a.n_tokens), b.tokens(0, b.n_tokens))
        assert np.array_equal(a.offsets, b.offsets)


def test_parallel_processes_and_an_interrupted_build(store, inputs, tmp_path):
    spec = BuildSpec(inputs=(str(inputs / "*"),), out=str(tmp_path / "s"), tokenizer=str(store.path / "tokenizer.json"),
                     heldout_fraction=0.1, shard_tokens=1500)
    build_store(spec, stage="tokenize", jobs=2, progress=False)
    # an interruption in the middle of the shard stage: one shard done, the rest not
    build_store(spec, stage="shard", worker=0, workers=4, progress=False)
    with pytest.raises(DataError, match="interrupted build"):
        TokenStore(tmp_path / "s")
    build_store(spec, jobs=2, progress=False, log=lambda s: None)  # the same command again finishes it
    assert TokenStore(tmp_path / "s").fingerprint == store.fingerprint


def test_damaged_store_is_named(store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    shard = copy / "train" / "shard-00000.tok"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{shard}.*damaged"):
        TokenStore(copy)


def test_damaged_store_exits_with_the_data_code_not_the_config_one(store, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    (copy / "heldout" / "offsets.bin").write_bytes(b"\0" * 8)
    args = ["data", "stats", f"data.sources=[{{name: web, path: '{copy}'}}]", "data.seq_len=32",
            "model.vocab_size=512", f"run_dir={tmp_path / 'run'}"]
    assert main(args) == EXIT_DATA
    assert f"data error: store index {copy / 'heldout' / 'offsets.bin'} does not match" in capsys.readouterr().err
    shutil.copy(store.path / "heldout" / "offsets.bin", copy / "heldout" / "offsets.bin")
    (copy / "tokenizer.json").write_text("{not json")
    assert main(args) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"data error: store {copy} is corrupt" in err
    assert f"store tokenizer='{copy / 'tokenizer.json'}' is not a valid" in err


def test_a_bad_tokenizer_flag_is_named(inputs, tmp_path, capsys):
    common = ["data", "build", str(inputs / "e.txt"), "--out", str(tmp_path / "s"), "--no-progress", "--jobs", "1"]
    assert main([*common, "--tokenizer", str(tmp_path / "missing.json")]) == EXIT_CONFIG
    assert f"config error: --tokenizer='{tmp_path / 'missing.json'}': file not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main([*common, "--tokenizer", str(tmp_path / "bad.json")]) == EXIT_CONFIG
    assert "config error: --tokenizer=" in capsys.readouterr().err
    assert not (tmp_path / "s" / "build").exists()  # refused before any work


def test_data_cli_inspect_and_stats(small_corpus, tmp_path, capsys):
    from tests.conftest import TINY

    args = [*TINY, f"data.corpus={small_corpus}", f"run_dir={tmp_path / 'run'}"]
    assert main(["data", "inspect", "--step", "5", "--json", "--hosts", "2", "--host", "1", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 5 and [r["row"] for r in out["rows"]] == [4, 5, 6, 7]
    assert all(r["source"] == "corpus" and r["documents"] and r["text"] for r in out["rows"])
    assert main(["data", "inspect", "--step", "5", *args]) == 0
    table = capsys.readouterr().out
    assert "step 5" in table and out["rows"][0]["text"][:20].replace("\n", "⏎") in table
    assert main(["data", "stats", "--step", "100", "--json", *args]) == 0
    stats = json.loads(capsys.readouterr().out)["sources"][0]
    assert stats["sequences_consumed"] == 800 and stats["epochs_consumed"] == pytest.approx(800 / stats["sequences"])
    assert main(["data", "stats", *args]) == 0
    assert "epochs" in capsys.readouterr().out


def test_windows_across_shards_read_the_virtual_stream(store):
    train = store.split("train")
    seq = 50
    ids = np.arange(train.windows(seq))
    tokens, first = train.gather(ids, seq)
    stream = train.tokens(0, train.n_tokens)
    assert len(train.shards) > 2
    for w in ids:
        np.testing.assert_array_equal(tokens[w], stream[w * seq : w * seq + seq + 1])
        doc = np.searchsorted(train.offsets, w * seq, side="right") - 1
        assert first[w] == w * seq - train.offsets[doc]


def test_foreign_tokenizer_without_keel_specials(inputs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tok.json"))
    spec = BuildSpec(inputs=(str(inputs / "e.txt"),), out=str(tmp_path / "s"), tokenizer=str(tmp_path / "tok.json"))
    store = TokenStore(build_store(spec, progress=False, log=lambda s: None))
    assert store.tokenizer.token_to_id("<bos>") == store.bos_id == 31  # added after the tokenizer's own vocabulary
    from keel.data.tokenizer import load_tokenizer, tokenizer_hash

    assert tokenizer_hash(load_tokenizer(tmp_path / "tok.json")) == store.manifest["tokenizer"]["sha256"]


def test_large_vocab_stores_uint32(tmp_path):
    docs = [np.array([1, 70_000, 5, 2]), np.array([1, 3, 69_999, 4, 2])]
    store = write_store(tmp_path / "big", {"train": docs}, vocab_size=70_001)
    tokens, first = store.split("train").gather(np.array([0, 1, 2]), 2)
    assert store.dtype == np.uint32 and tokens.dtype == np.uint32
    np.testing.assert_array_equal(tokens, [[1, 70_000, 5], [5, 2, 1], [1, 3, 69_999]])
    np.testing.assert_array_equal(first, [0, 2, 0])



def _window_ids(draw, n: int, count: int) -> np.ndarray:
    """`count` window ids of a split with n windows: all inside, or (half the time) one of them outside."""
    ids = [draw(st.integers(0, n - 1)) if n else -1 for _ in range(count)]
    if count and draw(st.booleans()):
        ids[draw(st.integers(0, count - 1))] = draw(st.sampled_from([-1, -(2**40), n, n + 1, 2**40]))
    return np.array(ids, dtype=np.int64)


def _first_outside(splits, ids, seq):
    """The error the gather must raise: the first id outside its split, splits in order (None: all inside)."""
    for sp, w in zip(splits, ids, strict=True):
        n = sp.windows(seq)
        bad = w[(w < 0) | (w >= n)]
        if bad.size:
            return re.escape(f"window {bad[0]} of split {sp.root} is outside [0, {n})")
    return None


def _check_rows(splits, ids, which, seq, tokens, first):
    rank = {k: 0 for k in range(len(splits))}
    for r, k in enumerate(which.ravel()):
        sp, w = splits[k], int(ids[k][rank[k]])
        rank[k] += 1
        np.testing.assert_array_equal(tokens.reshape(-1, seq + 1)[r], sp.tokens(w * seq, w * seq + seq + 1))
        doc = np.searchsorted(sp.offsets, w * seq, side="right") - 1
        assert first.ravel()[r] == w * seq - sp.offsets[doc]


@settings(max_examples=120, deadline=None)
@given(seq=st.integers(1, 60), rows=st.integers(1, 12), data=st.data())
def test_property_gather_reads_its_windows_or_refuses_ids_outside_the_split(store, seq, rows, data):
    """Token reads go through raw addresses: any id outside [0, windows) must be an IndexError naming the split and
    the window, never a read outside the maps. Inside, a window (even across a shard's end) is its tokens."""
    splits = [store.split("train"), store.split("heldout")]
    assert len(splits[0].shards) > 2
    # Split.gather: one split
    ids = _window_ids(data.draw, splits[0].windows(seq), rows)
    error = _first_outside(splits[:1], [ids], seq)
    if error:
        with pytest.raises(IndexError, match=error):
            splits[0].gather(ids, seq)
    else:
        tokens, first = splits[0].gather(ids, seq)
        _check_rows(splits[:1], [ids], np.zeros(rows, np.int64), seq, tokens, first)
    # TokenSpace.gather: rows of two splits interleaved, in a (2, rows) layout as the loader uses
    which = np.array(data.draw(st.lists(st.integers(0, 1), min_size=2 * rows, max_size=2 * rows))).reshape(2, rows)
    ids = [_window_ids(data.draw, sp.windows(seq), int((which == k).sum())) for k, sp in enumerate(splits)]
    error = _first_outside(splits, ids, seq)
    space = TokenSpace(splits, seq)
    if error:
        with pytest.raises(IndexError, match=error):
            space.gather(ids, which)
    else:
        tokens, first = space.gather(ids, which)
        assert tokens.shape == (2, rows, seq + 1) and first.shape == (2, rows)
        _check_rows(splits, ids, which, seq, tokens, first)


def test_reads_outside_a_split_are_refused(store):
    train = store.split("train")
    space = TokenSpace([train], 10)
    with pytest.raises(ValueError, match="3 window ids for 2 rows"):
        space.gather([np.array([0, 1, 2])], np.zeros(2, np.int64))
    with pytest.raises(IndexError, match="split index outside"):
        space.gather([np.array([0])], np.array([1]))
    for start, stop in ((-1, 5), (5, train.n_tokens + 1), (7, 6)):
        with pytest.raises(IndexError, match=f"tokens \\[{start}, {stop}\\) of split .*train are outside"):
            train.tokens(start, stop)
        with pytest.raises(IndexError):
            train.documents_in(start, stop)
