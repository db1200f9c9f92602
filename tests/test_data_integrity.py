"""Data integrity (issue 11, the data side): a shard with flipped bits stops a run before it trains and is named by
`keel data verify`; verification is paid once per content; rebuilding a store says what it does (refused with
the difference, `--force` swaps, identical inputs are a no-op that says so); and damaged input files are counted
per file, never the end of a build (under --strict: FILE:LINE, exit 4)."""

import gzip
import json
import os
import shutil
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from keel.cli import main
from keel.config import load_config
from keel.data.build import BuildSpec, build_store, write_store
from keel.data.loader import DataSource
from keel.data.prepare import open_sources, prepare_data
from keel.data.store import TokenStore
from keel.data.verify import record_path
from keel.errors import EXIT_DATA, DataError

QUIET = {"log": lambda s: None}


def _docs(rng, n, vocab=512):
    return [np.concatenate([[1], rng.integers(3, vocab, rng.integers(5, 120)), [2]]) for _ in range(n)]


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_store(tmp_path_factory.mktemp("clean") / "web", {"train": _docs(rng, 200), "heldout": _docs(rng, 20)},
                       vocab_size=512).path


@pytest.fixture
def store(clean_store, tmp_path):
    """A private copy of a good store, to damage."""
    shutil.copytree(clean_store, tmp_path / "web")
    return tmp_path / "web"


def _flip_bit(path, at=101, keep_mtime=False):
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    if keep_mtime:  # what a careless tool (or an attacker) does; ctime still moves
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _cfg(store, run_dir, *extra):
    return load_config("tiny", [f"data.sources=[{{name: web, path: '{store}'}}]", "data.seq_len=32",
                                "model.vocab_size=512", f"run_dir={run_dir}", *extra])


# ------------------------------------------------------------------------------------------ store integrity


def test_a_flipped_bit_in_a_shard_stops_the_run_before_training(store, tmp_path, capsys):
    from tests.conftest import TINY

    shard = store / "train" / "shard-00000.tok"
    manifest = json.loads((store / "manifest.json").read_text())
    expected = manifest["splits"]["train"]["shards"][0]["sha256"]
    prepare_data(_cfg(store, tmp_path / "run"), tmp_path / "run", **QUIET)  # verified (and recorded) while good
    _flip_bit(shard)
    with pytest.raises(DataError) as e:
        prepare_data(_cfg(store, tmp_path / "run"), tmp_path / "run", **QUIET)
    assert e.value.exit_code == EXIT_DATA
    msg = str(e.value)
    assert f"{shard}: sha256 " in msg and f"the manifest says {expected}" in msg
    actual = msg.split(f"{shard}: sha256 ")[1].split(",")[0]
    assert len(actual) == 64 and actual != expected
    # the real entry point: keel train ends with the data code before any step
    run_dir = tmp_path / "train-run"
    args = [a for a in TINY if not a.startswith("data.")] + [
        f"data.sources=[{{name: web, path: '{store}'}}]", "data.seq_len=32", f"run_dir={run_dir}"]
    assert main(["train", *args]) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"data error: store {store} is corrupt" in err and str(shard) in err and expected in err
    assert not (run_dir / "metrics.jsonl").exists() or "loss" not in (run_dir / "metrics.jsonl").read_text()


def test_verification_is_paid_once_per_content(store, tmp_path):
    lines = []
    cfg = _cfg(store, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}")
    first = prepare_data(cfg, tmp_path / "run", log=lines.append)
    # tokenizer.json, 2 shards, 2 x (offsets.bin, unigram.bin)
    assert any(line.startswith("data: verified 7 files") for line in lines)
    record = record_path(tmp_path / "cache", store)
    assert record.exists() and not list(store.rglob("*verified*"))  # beside the run's data cache, not in the store
    lines.clear()
    second = prepare_data(cfg, tmp_path / "run2", log=lines.append)  # a restart, another run on the cache dir
    assert any("all 7 files unchanged since verified" in line for line in lines)
    # verification changes nothing the run's data fingerprint is made of
    plain = DataSource(cfg, open_sources(cfg, tmp_path / "run", **QUIET))
    assert first.fingerprint == second.fingerprint == plain.fingerprint
    # a write that puts the old mtime back is still seen (ctime), and so is a copy (new inodes)
    _flip_bit(store / "heldout" / "shard-00000.tok", at=3, keep_mtime=True)
    with pytest.raises(DataError, match="heldout/shard-00000.tok: sha256"):
        prepare_data(cfg, tmp_path / "run", **QUIET)


def test_a_copied_store_is_verified_again(store, tmp_path):
    cfg = _cfg(store, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}")
    prepare_data(cfg, tmp_path / "run", **QUIET)
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)  # copy2 keeps sizes and mtimes
    record = record_path(tmp_path / "cache", store)
    shutil.copy(record, record_path(tmp_path / "cache", copy))  # even with the original's record
    lines = []
    prepare_data(_cfg(copy, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"), tmp_path / "run",
                 log=lines.append)
    assert any(line.startswith("data: verified 7 files") for line in lines)


def test_keel_data_verify_names_the_shard_and_exits_4(store, capsys):
    assert main(["data", "verify", str(store)]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ("tokenizer.json", "train/shard-00000.tok", "heldout/offsets.bin"))
    assert "7 files" in out and "all match the manifest" in out
    shard = store / "train" / "shard-00000.tok"
    expected = json.loads((store / "manifest.json").read_text())["splits"]["train"]["shards"][0]["sha256"]
    _flip_bit(shard, keep_mtime=True)
    assert main(["data", "verify", str(store)]) == EXIT_DATA
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if "train/shard-00000.tok" in line)
    assert "SHA256" in row and "1 do not match the manifest" in captured.out
    assert f"{shard}: sha256 " in captured.err and f"the manifest says {expected}" in captured.err
    # the index files are covered too, and a missing file is named
    _flip_bit(store / "train" / "offsets.bin", at=9)
    (store / "heldout" / "shard-00000.tok").unlink()
    assert main(["data", "verify", str(store), "--json"]) == EXIT_DATA
    report = json.loads(capsys.readouterr().out)
    assert {f["file"] for f in report["files"] if not f["ok"]} == {
        "train/shard-00000.tok", "train/offsets.bin", "heldout/shard-00000.tok"}
    assert main(["data", "verify", str(store.parent / "nothing")]) == EXIT_DATA
    assert "not a complete token store" in capsys.readouterr().err


def test_a_store_without_index_hashes_is_verified_for_what_it_records(store, capsys):
    manifest = json.loads((store / "manifest.json").read_text())
    for meta in manifest["splits"].values():
        del meta["index"]  # as written before keel recorded them
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert TokenStore(store).fingerprint == manifest["fingerprint"]
    assert main(["data", "verify", str(store)]) == 0
    out = capsys.readouterr().out
    assert "3 files" in out and "not checked (the manifest has no hash for them" in out and "train/offsets.bin" in out


# ------------------------------------------------------------------------------------------------ rebuilds


@pytest.fixture
def texts(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):
        docs = [json.dumps({"text": f"file {k} document {i} " + "word " * (i % 9)}) for i in range(120)]
        (d / f"f{k}.jsonl").write_text("\n".join(docs) + "\n")
    return d


def _cli_build(inputs, out, *extra):
    return main(["data", "build", *map(str, inputs), "--out", str(out), "--vocab-size", "300", "--jobs", "1",
                 "--heldout-fraction", "0.1", "--shard-tokens", "2000", "--no-progress", *extra])


def test_rebuilds_say_what_they_do(texts, tmp_path, capsys):
    out = tmp_path / "store"
    two = [texts / "f0.jsonl", texts / "f1.jsonl"]
    assert _cli_build(two, out) == 0
    before = TokenStore(out)
    capsys.readouterr()
    # identical inputs: a no-op that says so, on stdout
    assert _cli_build(two, out) == 0
    assert f"{out} is up to date: the same 2 input files" in capsys.readouterr().out
    os.utime(texts / "f0.jsonl")  # touched, same content: still a no-op
    assert _cli_build(two, out) == 0
    assert "(1 touched, re-hashed: same content)" in capsys.readouterr().out
    # an extra file: refused with the difference; the store is untouched
    assert _cli_build([*two, texts / "f2.jsonl"], out) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"added 1 input file: {texts / 'f2.jsonl'}" in err and "--force" in err
    assert TokenStore(out).manifest == before.manifest
    # a removed and a changed file, and other settings, are listed too
    with open(texts / "f1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert _cli_build([texts / "f1.jsonl"], out, "--vocab-size", "301") == EXIT_DATA
    err = capsys.readouterr().err
    assert f"removed 1 input file: {texts / 'f0.jsonl'}" in err
    assert f"changed 1 input file: {texts / 'f1.jsonl'}" in err and "setting vocab_size: 300 -> 301" in err
    # --force: built next to it and swapped in (on one machine); a rebuild that fails leaves the old store as it was
    assert _cli_build(two, out, "--force", "--stage", "tokenize", "--tokenizer", str(out / "tokenizer.json")) == 2
    assert "--force rebuilds on one machine" in capsys.readouterr().err
    (texts / "bad.jsonl").write_text("{not json\n")
    assert _cli_build([*two, texts / "bad.jsonl"], out, "--force", "--strict") == EXIT_DATA
    assert "malformed json (--strict)" in capsys.readouterr().err
    assert TokenStore(out).manifest == before.manifest and sorted(p.name for p in tmp_path.iterdir()) == ["in", "store"]
    inode = out.stat().st_ino
    assert _cli_build([*two, texts / "f2.jsonl"], out, "--force") == 0
    assert "swapped in" in capsys.readouterr().out
    after = TokenStore(out)
    assert out.stat().st_ino != inode and sorted(p.name for p in tmp_path.iterdir()) == ["in", "store"]
    assert after.manifest["inputs"]["files"] == 3 and after.manifest["inputs"]["documents"] == 361
    assert set(after.manifest["inputs"]["by_file"]) == {str(texts / f"f{k}.jsonl") for k in range(3)}
    assert main(["data", "verify", str(out)]) == 0


def test_an_interrupted_build_of_other_inputs_is_not_reused(texts, tmp_path):
    tok = tmp_path / "tok"
    build_store(BuildSpec(inputs=(str(texts / "f0.jsonl"),), out=str(tok), vocab_size=300), progress=False, **QUIET)
    spec = BuildSpec(inputs=(str(texts / "f0.jsonl"), str(texts / "f1.jsonl")), out=str(tmp_path / "s"),
                     tokenizer=str(tok / "tokenizer.json"), heldout_fraction=0.1, shard_tokens=2000)
    build_store(spec, stage="tokenize", progress=False)
    build_store(spec, stage="shard", worker=0, workers=2, progress=False)  # interrupted: half of the shards
    other = BuildSpec(**{**spec.__dict__, "inputs": (str(texts / "f2.jsonl"), str(texts / "f1.jsonl"))})
    done = TokenStore(build_store(other, progress=False, **QUIET))
    fresh = TokenStore(build_store(BuildSpec(**{**other.__dict__, "out": str(tmp_path / "fresh")}), progress=False,
                                   **QUIET))
    assert done.fingerprint == fresh.fingerprint
    assert sorted(p.name for p in (tmp_path / "s" / "train").iterdir()) == sorted(
        p.name for p in (tmp_path / "fresh" / "train").iterdir())


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """One good file and one of each kind of damage the issue found aborting builds."""
    d = tmp_path_factory.mktemp("damaged")
    good = "".join(json.dumps({"text": f"a good document {i} " + "word " * (i % 5)}) + "\n" for i in range(100))
    (d / "good.jsonl").write_text(good)
    packed = gzip.compress(good.encode())
    (d / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    packed = zstandard.ZstdCompressor().compress(good.encode())
    (d / "cut.jsonl.zst").write_bytes(packed[: len(packed) // 2])
    (d / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), d / "broken.parquet")
    (d / "broken.parquet").write_bytes((d / "broken.parquet").read_bytes()[:-40])
    (d / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "lone \\ud800 half"}\n'
                                       '{"text": "a pair \\ud83d\\ude00 is fine"}\n')
    return d


@pytest.mark.parametrize("given_tokenizer", [False, True])
def test_damaged_inputs_are_counted_per_file_and_the_build_completes(damaged, tmp_path, given_tokenizer):
    tokenizer = ""
    if given_tokenizer:  # TypeError in the tokenizer before; UnicodeEncodeError when training one
        tokenizer = str(build_store(BuildSpec(inputs=(str(damaged / "good.jsonl"),), out=str(tmp_path / "t"),
                                              vocab_size=300), progress=False, **QUIET) / "tokenizer.json")
    spec = BuildSpec(inputs=(str(damaged / "*"),), out=str(tmp_path / "s"), tokenizer=tokenizer, vocab_size=300,
                     heldout_fraction=0.1)
    lines = []
    store = TokenStore(build_store(spec, progress=False, log=lines.append))
    m = store.manifest["inputs"]
    assert m["bad"]["unreadable"] == 4 and m["bad"]["unencodable"] == 1
    by_file = m["bad_by_file"]
    assert by_file[str(damaged / "cut.jsonl.gz")] == {"unreadable": 1}
    assert by_file[str(damaged / "cut.jsonl.zst")] == {"unreadable": 1}
    assert by_file[str(damaged / "empty.parquet")] == {"unreadable": 1}
    assert by_file[str(damaged / "broken.parquet")] == {"unreadable": 1}
    assert by_file[str(damaged / "surrogate.jsonl")] == {"unencodable": 1}
    docs = {k: v["documents"] for k, v in m["by_file"].items()}
    assert docs[str(damaged / "good.jsonl")] == 100 and docs[str(damaged / "surrogate.jsonl")] == 2
    # what came before the break is kept (zstd: only whole blocks, none in a file this small)
    assert 0 < docs[str(damaged / "cut.jsonl.gz")] < 100 and docs[str(damaged / "cut.jsonl.zst")] < 100
    assert docs[str(damaged / "empty.parquet")] == 0
    assert any("skipped 5 bad inputs in 5 file(s)" in line for line in lines)
    assert store.split("train").n_documents + store.split("heldout").n_documents == m["documents"]


def _complete_lines(path):
    """Lines a truncated compressed file holds in full, decompressed independently of keel's reader."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        return zlib.decompressobj(wbits=31).decompress(data).count(b"\n")
    return zstandard.ZstdDecompressor().decompressobj().decompress(data).count(b"\n")


@pytest.mark.parametrize(("name", "where"), [
    ("cut.jsonl.gz", ":{n}: unreadable (EOFError: Compressed file ended"),
    ("cut.jsonl.zst", ":{n}: unreadable (EOFError: the zstd stream ended inside a frame"),
    ("empty.parquet", ": unreadable (ArrowInvalid: Parquet file size is 0 bytes"),
    ("broken.parquet", ": unreadable (ArrowInvalid"),
    ("surrogate.jsonl", ":2: unencodable (lone surrogate '\\ud800' at character 5)"),
])
def test_strict_names_the_damaged_file_and_line(damaged, tmp_path, capsys, name, where):
    code = main(["data", "build", str(damaged / name), "--out", str(tmp_path / "s"), "--strict", "--jobs", "1",
                 "--vocab-size", "300", "--no-progress"])
    assert code == EXIT_DATA
    err = capsys.readouterr().err
    where = where.format(n=_complete_lines(damaged / name) + 1) if "{n}" in where else where
    assert f"data error: {damaged / name}{where}" in err and "(--strict)" in err
