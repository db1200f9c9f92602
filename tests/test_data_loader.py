import numpy as np
import pytest

from keel.config import ConfigError, load_config
from keel.data.loader import DataSource, TokenStream


@pytest.fixture(scope="module")
def source(small_corpus, tmp_path_factory):
    from tests.conftest import TINY

    cfg = load_config("tiny", [*TINY, f"data.corpus={small_corpus}"])
    return DataSource(cfg, tmp_path_factory.mktemp("run"), log=lambda s: None)


def test_batch_is_a_pure_function_of_step(source, tmp_path):
    again = DataSource(source.cfg, tmp_path, log=lambda s: None)  # retrains the BPE: same tokenizer
    assert again.fingerprint == source.fingerprint
    for step in (0, 1, 7, 1000):
        a, b = source.global_batch(step), again.global_batch(step)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("hosts", [1, 2, 4, 8])
def test_hosts_take_contiguous_rows_of_the_same_global_batch(source, hosts):
    for step in (0, 3, 50):
        parts = [source.host_batch(step, h, hosts) for h in range(hosts)]
        whole = source.global_batch(step)
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_each_epoch_visits_every_window_once(source):
    per_epoch = source.n_windows
    steps = (2 * per_epoch) // source.batch_size
    ids = np.concatenate([source.window_ids(s) for s in range(steps)])
    first, second = ids[:per_epoch], ids[per_epoch : 2 * per_epoch]
    assert sorted(first.tolist()) == list(range(per_epoch))
    if len(second) == per_epoch:
        assert sorted(second.tolist()) == list(range(per_epoch))
        assert not np.array_equal(first, second)  # a fresh order each epoch


def test_packing_marks_documents():
    # documents of lengths 3, 4, 5: <bos> a b, ...
    tokens = np.arange(12, dtype=np.uint16)
    stream = TokenStream(tokens, np.array([0, 3, 7]))
    b = stream.gather(np.array([0, 1]), seq_len=5)
    np.testing.assert_array_equal(b["inputs"][0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(b["targets"][0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0, 1])
    # the target after token 2 is the next document's first token: not learnable, masked
    np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(b["inputs"][1], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(b["segment_ids"][1], [1, 1, 2, 2, 2])
    np.testing.assert_array_equal(b["positions"][1], [2, 3, 0, 1, 2])
    np.testing.assert_array_equal(b["loss_mask"][1], [1, 0, 1, 1, 1])


def test_real_batches_start_documents_with_bos(source):
    b = source.global_batch(0)
    starts = b["positions"] == 0
    assert (b["inputs"][starts] == source.bos_id).all()
    assert (b["loss_mask"][:, :-1][starts[:, 1:]] == 0).all()


def test_unigram_entropy_of_uniform_tokens():
    stream = TokenStream(np.repeat(np.arange(8, dtype=np.uint16), 5), np.array([0]))
    assert stream.unigram_entropy() == pytest.approx(np.log(8))


def test_corpus_too_small_for_batch(small_corpus, tmp_path):
    cfg = load_config("tiny", [f"data.corpus={small_corpus}", "model.vocab_size=512", "data.seq_len=100000"])
    with pytest.raises(ConfigError, match="data.seq_len=100000"):
        DataSource(cfg, tmp_path, log=lambda s: None)


def test_tokenizer_larger_than_model_vocab(small_corpus, tmp_path):
    cfg = load_config("tiny", [f"data.corpus={small_corpus}", "model.vocab_size=512"])
    DataSource(cfg, tmp_path / "a", log=lambda s: None)
    small = load_config("tiny", [f"data.corpus={small_corpus}", "model.vocab_size=300",
                                 f"data.tokenizer={tmp_path / 'a' / 'tokenizer.json'}"])
    with pytest.raises(ConfigError, match="model.vocab_size=300"):
        DataSource(small, tmp_path / "b", log=lambda s: None)


def test_missing_corpus(tmp_path):
    cfg = load_config("tiny", [f"data.corpus={tmp_path}/*.txt"])
    with pytest.raises(ConfigError, match="matches no files"):
        DataSource(cfg, tmp_path, log=lambda s: None)
