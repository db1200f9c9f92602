"""`keel data build`: formats, bad input, multi-worker equality, restartability, and the CLI around it."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from keel.cli import main
from keel.data.store import BuildSpec, DataError, TokenStore, build_store
from keel.errors import EXIT_DATA


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
    assert m["inputs"]["bad"] == {"malformed_json": 1, "missing_field": 2, "not_utf8": 1, "empty": 2}
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
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    shard = copy / "train" / "shard-00000.tok"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{shard}.*damaged"):
        TokenStore(copy)


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
    from keel.data.store import write_store

    docs = [np.array([1, 70_000, 5, 2]), np.array([1, 3, 69_999, 4, 2])]
    store = write_store(tmp_path / "big", {"train": docs}, vocab_size=70_001)
    tokens, first = store.split("train").gather(np.array([0, 1, 2]), 2)
    assert store.dtype == np.uint32 and tokens.dtype == np.uint32
    np.testing.assert_array_equal(tokens, [[1, 70_000, 5], [5, 2, 1], [1, 3, 69_999]])
    np.testing.assert_array_equal(first, [0, 2, 0])
