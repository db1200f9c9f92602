"""The run's data: `prepare_data` (stores opened or built, errors of the right kind) and `DataSource` (batches by
step — replay, hosts, resume, packing, mixtures), plus the inspection functions over it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.config import load_config
from keel.data.build import write_store
from keel.data.inspect import inspect_batch, source_stats, unigram_entropy
from keel.data.loader import Prefetcher
from keel.data.pack import expand
from keel.data.prepare import prepare_data
from keel.errors import ConfigError, DataError

QUIET = {"log": lambda s: None}


def _docs(rng, n, lo=5, hi=200, vocab=1000, bos=1, eos=2):
    out = []
    for _ in range(n):
        body = rng.integers(3, vocab, rng.integers(lo, hi))
        out.append(np.concatenate([[bos], body, [eos]]))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("stores")
    sizes = {"web": 300, "code": 40, "math": 120}
    return {name: write_store(root / name, {"train": _docs(rng, n), "heldout": _docs(rng, 10)}, vocab_size=1000).path
            for name, n in sizes.items()}


def _mixture(stores, tmp_path, *extra, batch=16):
    srcs = ",".join(f"{{name: {n}, path: '{p}', weight: {w}}}"
                    for (n, p), w in zip(stores.items(), (0.5, 0.2, 0.3), strict=True))
    cfg = load_config("tiny", [f"data.sources=[{srcs}]", "data.seq_len=64", f"train.batch_size={batch}",
                               f"run_dir={tmp_path}", *extra])
    return prepare_data(cfg, tmp_path, **QUIET)


@pytest.fixture(scope="module")
def source(small_corpus, tmp_path_factory):
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", [*TINY, f"data.corpus={small_corpus}", f"run_dir={run}"])
    return prepare_data(cfg, run, **QUIET)


@pytest.fixture(scope="module")
def corpus_args(source, small_corpus):
    """Overrides that reuse `source`'s built corpus store (the cache key leaves out seq_len and the model)."""
    return [f"data.corpus={small_corpus}", "model.vocab_size=512", "data.heldout_fraction=0.1",
            f"data.cache_dir={source.sources[0].store.path.parent}"]


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_corpus_goes_through_the_store_and_batches_replay(source, tmp_path):
    from tests.conftest import TINY

    assert (source.sources[0].store.path / "manifest.json").exists()
    fresh = load_config("tiny", [*TINY, f"data.corpus={source.cfg.data.corpus}", f"run_dir={tmp_path}",
                                 f"data.cache_dir={tmp_path / 'fresh'}"])
    again = prepare_data(fresh, tmp_path, **QUIET)  # a fresh build (BPE retrained): same data, same batches
    assert again.sources[0].store.path.parent == tmp_path / "fresh"
    assert again.fingerprint == source.fingerprint
    for step in (0, 1, 7, 1000):
        _equal(source.global_batch(step), again.global_batch(step))


@pytest.mark.parametrize("hosts", [1, 2, 4, 8])
def test_hosts_take_contiguous_rows_of_the_same_global_batch(stores, tmp_path, hosts):
    data = _mixture(stores, tmp_path)
    for step in (0, 3, 50, 10_000):
        parts = [data.host_batch(step, h, hosts) for h in range(hosts)]
        whole = data.global_batch(step)
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_resume_and_prefetch_depth_do_not_change_batches(stores, tmp_path):
    data = _mixture(stores, tmp_path)
    straight = dict(Prefetcher(data, range(0, 40), depth=1))
    resumed = dict(Prefetcher(_mixture(stores, tmp_path), range(17, 40), depth=7))
    for step in range(17, 40):
        _equal(straight[step], resumed[step])
        _equal(straight[step], data.global_batch(step))


def test_eval_sets_per_source(stores, tmp_path):
    data = _mixture(stores, tmp_path)
    sets = data.eval_sets(2)
    assert list(sets) == ["web", "code", "math"]
    assert data.eval_weights == {"web": 0.5, "code": 0.2, "math": 0.3}
    for name, batches in sets.items():
        h = data.heldout[list(sets).index(name)]
        assert [b["tokens"].shape for b in batches] == [(16, 65)] * 2
        np.testing.assert_array_equal(batches[0]["tokens"][0], h.tokens(0, 65))


def test_mixture_rows_and_epochs(stores, tmp_path):
    data = _mixture(stores, tmp_path, batch=20)
    rows = data.rows(np.arange(100))
    counts = np.stack([np.bincount(r, minlength=3) for r in rows.source])
    np.testing.assert_array_equal(counts, np.tile([10, 4, 6], (100, 1)))
    stats = {s["source"]: s for s in source_stats(data, 100)}
    assert stats["code"]["sequences_consumed"] == 400
    assert stats["code"]["epochs_consumed"] == pytest.approx(400 / data.order.n_sequences[1])


def test_max_epochs_is_checked_before_training_and_at_the_batch(stores, tmp_path):
    srcs = [f"{{name: {n}, path: '{p}', max_epochs: 1}}" for n, p in stores.items()]
    cfg = load_config("tiny", [f"data.sources=[{','.join(srcs)}]", "data.seq_len=64", f"run_dir={tmp_path}"])
    data = prepare_data(cfg, tmp_path, **QUIET)
    n_code = data.order.n_sequences[1]
    limit_step = next(s for s in range(10_000) if data.plan.cumulative(s + 1)[1] > n_code)
    data.check_budget(limit_step)
    with pytest.raises(ConfigError, match="'code' would be repeated"):
        data.check_budget(limit_step + 1)
    data.global_batch(limit_step - 1)
    with pytest.raises(DataError, match=f"'code' reached its repetition limit max_epochs=1 .* at step {limit_step}"):
        data.global_batch(limit_step)


def test_schedule_leaves_earlier_batches_alone(stores, tmp_path):
    plain = _mixture(stores, tmp_path)
    changed = _mixture(stores, tmp_path, "data.mixture_schedule=[{step: 30, weights: {code: 1}}]")
    for step in (0, 29):
        _equal(plain.global_batch(step), changed.global_batch(step))
    assert (changed.rows(30).source == 1).all()
    assert changed.fingerprint != plain.fingerprint


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), seq=st.integers(2, 40), n_docs=st.integers(1, 12))
def test_expand_matches_a_per_token_reference(seed, seq, n_docs):
    rng = np.random.default_rng(seed)
    docs = _docs(rng, n_docs, lo=0, hi=30, vocab=50)
    stream = np.concatenate(docs)
    doc_of = np.repeat(np.arange(n_docs), [len(d) for d in docs])
    pos_in = np.concatenate([np.arange(len(d)) for d in docs])
    starts = rng.integers(0, max(1, len(stream) - seq), 4)
    starts = starts[starts + seq + 1 <= len(stream)]
    if not len(starts):
        return
    tokens = np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.uint16)
    b = expand(tokens, pos_in[starts].astype(np.int32), bos=1, pad=0)
    for r, s in enumerate(starts):
        idx = np.arange(s, s + seq)
        seg = doc_of[idx] - doc_of[s] + 1
        np.testing.assert_array_equal(b["segment_ids"][r], seg)
        np.testing.assert_array_equal(b["positions"][r], pos_in[idx])
        np.testing.assert_array_equal(b["loss_mask"][r], doc_of[idx] == doc_of[idx + 1])
        np.testing.assert_array_equal(b["targets"][r], stream[s + 1 : s + seq + 1])


def test_expand_on_device_equals_numpy(stores, tmp_path):
    import jax.numpy as jnp

    data = _mixture(stores, tmp_path)
    hb = data.global_batch(5)
    ref = expand(hb["tokens"], hb["first_position"], data.bos_id, data.pad_id)
    dev = expand(jnp.asarray(hb["tokens"]), jnp.asarray(hb["first_position"]), data.bos_id, data.pad_id, jnp)
    for k in ref:
        np.testing.assert_array_equal(ref[k], np.asarray(dev[k]))


def test_real_batches_start_documents_with_bos(source):
    b = expand(**source.global_batch(0), bos=source.bos_id, pad=source.pad_id)
    starts = b["positions"] == 0
    assert (b["inputs"][starts] == source.bos_id).all()
    assert (b["loss_mask"][:, :-1][starts[:, 1:]] == 0).all()


def test_inspect_names_documents_and_text(source):
    rows = inspect_batch(source, 3, host=1, n_hosts=2)
    assert [r["row"] for r in rows] == list(range(4, 8))
    seq_len = source.seq_len
    for r in rows:
        a, b = r["tokens"]
        assert b - a == seq_len + 1 and r["documents"] and r["text"]
        assert sum(d["end"] - d["start"] for d in r["documents"]) == seq_len + 1


def test_mixed_tokenizers_are_refused(stores, tmp_path):
    from tokenizers import Tokenizer, models

    other = write_store(tmp_path / "other", {"train": _docs(np.random.default_rng(1), 50),
                                             "heldout": _docs(np.random.default_rng(2), 5)}, vocab_size=1000,
                        tokenizer=Tokenizer(models.WordLevel({"a": 0, "<bos>": 1, "<eos>": 2}, unk_token="a")))
    two = f"[{{name: a, path: '{stores['web']}'}}, {{name: b, path: '{other.path}'}}]"
    cfg = load_config("tiny", [f"data.sources={two}", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="different tokenizers"):
        prepare_data(cfg, tmp_path, **QUIET)


def test_corpus_too_small_for_seq_len(corpus_args, tmp_path):
    cfg = load_config("tiny", [*corpus_args, "data.seq_len=1000000"])
    with pytest.raises(ConfigError, match="data.seq_len=1000000"):
        prepare_data(cfg, tmp_path, **QUIET)


def test_tokenizer_larger_than_model_vocab(source, corpus_args, stores, tmp_path):
    cache = source.sources[0].store.path.parent
    built, before = source.sources[0].store.path / "tokenizer.json", set(cache.iterdir())
    small = load_config("tiny", [*corpus_args, "model.vocab_size=300", f"data.tokenizer={built}"])
    with pytest.raises(ConfigError, match="model.vocab_size=300 is smaller than the vocabulary of data.tokenizer="):
        prepare_data(small, tmp_path, **QUIET)
    assert set(cache.iterdir()) == before  # refused before building a store with it
    cfg = load_config("tiny", [f"data.sources=[{{name: web, path: '{stores['web']}'}}]", "model.vocab_size=500"])
    with pytest.raises(ConfigError, match="model.vocab_size=500 is smaller than the vocabulary of the tokenizer of"):
        prepare_data(cfg, tmp_path, **QUIET)


def test_missing_corpus_and_store(tmp_path):
    cfg = load_config("tiny", [f"data.corpus={tmp_path}/*.txt"])
    with pytest.raises(ConfigError, match="matches no files"):
        prepare_data(cfg, tmp_path, **QUIET)
    cfg = load_config("tiny", [f"data.sources=[{{name: x, path: '{tmp_path}/nope'}}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path=.*nope.* does not exist"):
        prepare_data(cfg, tmp_path, **QUIET)
    (tmp_path / "half").mkdir()
    cfg = load_config("tiny", [f"data.sources=[{{name: x, path: '{tmp_path}/half'}}]"])
    with pytest.raises(DataError, match="not a complete token store"):
        prepare_data(cfg, tmp_path, **QUIET)


def test_a_damaged_store_stays_a_data_error(stores, tmp_path):
    import shutil

    copy = tmp_path / "web"
    shutil.copytree(stores["web"], copy)
    shard = copy / "train" / "shard-00000.tok"
    shard.write_bytes(shard.read_bytes()[:-2])
    cfg = load_config("tiny", [f"data.sources=[{{name: web, path: '{copy}'}}]", "data.seq_len=64"])
    with pytest.raises(DataError, match=f"{shard}.*damaged") as e:
        prepare_data(cfg, tmp_path, **QUIET)
    assert not isinstance(e.value, ConfigError) and e.value.exit_code == 4


def test_unigram_entropy_of_the_mixture(stores, tmp_path):
    data = _mixture(stores, tmp_path)
    p = sum(w * np.bincount(s.train.tokens(0, s.train.n_tokens), minlength=1000) / s.train.n_tokens
            for s, w in zip(data.sources, (0.5, 0.2, 0.3), strict=True))
    p = p[p > 0]
    assert unigram_entropy(data) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert 0 < unigram_entropy(data) < np.log(1000)


@pytest.fixture(scope="module")
def mixed(stores, tmp_path_factory):
    return _mixture(stores, tmp_path_factory.mktemp("mixed"))


@settings(max_examples=25, deadline=None)
@given(step=st.integers(0, 10**7), hosts=st.sampled_from([1, 2, 4, 8, 16]), resume=st.integers(1, 5))
def test_property_hosts_replay_and_resume(mixed, step, hosts, resume):
    whole = mixed.global_batch(step)
    # host count: the hosts' rows, stacked, are the global batch
    parts = [mixed.host_batch(step, h, hosts) for h in range(hosts)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    # resume: a loader started `resume` steps earlier reaches the same batch
    start = max(0, step - resume)
    got = dict(mixed.host_batches(range(start, step + 1), block=3))[step]
    _equal(got, whole)
