"""Loss, perplexity and bits per byte checked by hand on a model whose every prediction is uniform; then, on one
tiny trained run: `keel eval`, `keel generate` and the end-of-run sample's criterion."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from keel import cli
from keel.config import ModelConfig
from keel.data.tokenizer import special_ids, train_bpe
from keel.evaluate.bpb import documents_stream, score_stream, token_bytes
from keel.model import transformer as T
from keel.model.sampling import READABLE, readable_sample, sample_quality

TEXTS = ["def f(x):\n    return x + 1\n", "naïve = 'café'  # ünïcode\n", "class A:\n    pass\n" * 3]


def test_a_uniform_model_scores_ln_v_per_token_and_its_bits_per_byte_by_hand():
    """All-zero parameters give zero logits (every RMSNorm of a zero vector is zero): each target costs ln V
    nats exactly. The targets are every token after a document's <bos>, its <eos> included; their bytes are
    the documents' UTF-8 bytes (byte-level BPE: exact, non-ASCII included)."""
    tok = train_bpe(TEXTS * 4, 300)
    pad, bos, eos = special_ids(tok)
    V = 300
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=16,
                      compute_dtype="float32")
    params = jax.tree.map(jnp.zeros_like, T.init_params(cfg, jax.random.key(0)))
    docs = [[bos, *tok.encode(t, add_special_tokens=False).ids, eos] for t in TEXTS]
    bytes_V = token_bytes(tok, V)
    for text, doc in zip(TEXTS, docs, strict=True):
        assert bytes_V[doc].sum() == len(text.encode("utf-8"))
    tokens, starts = documents_stream(docs)
    score = score_stream(params, cfg, tokens, starts, bytes_V, bos, pad, seq_len=8, batch_size=2)
    n_targets = sum(len(d) - 1 for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert (score.tokens, score.bytes) == (n_targets, n_bytes)
    assert score.loss == pytest.approx(math.log(V), rel=1e-6)
    assert score.perplexity == pytest.approx(V, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(n_targets * math.log2(V) / n_bytes, rel=1e-6)


@pytest.fixture(scope="module")
def trained_run(small_corpus, store_cache, tmp_path_factory):
    """A tiny model trained for 12 steps on the small corpus, shared by the tests below. With AdamW: in 12 steps
    Muon already makes this width-32 model favour a few tokens ("in") so much that a sample at temperature 0.7
    repeats one 4 times, which the loop test below is not about (the criterion is for a trained model: the
    default run, benchmarks/default_sample.py)."""
    from tests.conftest import TINY

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    args = [*TINY, f"data.corpus={small_corpus}", f"data.cache_dir={store_cache}", f"run_dir={run_dir}",
            "train.steps=12", "train.eval_every=12", "checkpoint.every=12", "train.log_every=6", "optim.name=adamw"]
    assert cli.main(["train", "--no-progress", *args]) == 0
    return run_dir


def test_keel_eval_reports_each_source_and_the_overall_numbers(trained_run, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(trained_run), "--json", "--max-tokens", "3000"]) == 0
    out = json.loads(capsys.readouterr().out)
    corpus, overall = out["sources"]["corpus"], out["overall"]
    assert out["step"] == 12 and corpus["tokens"] == overall["tokens"] > 2000
    assert math.log(2) < overall["loss"] < math.log(512) + 0.5  # trained a little: below ~uniform
    assert overall["perplexity"] == pytest.approx(math.exp(overall["loss"]))
    assert overall["bits_per_byte"] == pytest.approx(
        overall["loss"] * overall["tokens"] / math.log(2) / overall["bytes"])
    text = tmp_path / "one.py"
    text.write_text("import os\nprint(os.getcwd())\n")
    assert cli.main(["eval", str(trained_run), "--text", str(text), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)["sources"][str(text)]
    assert one["bytes"] == len(text.read_bytes()) and one["tokens"] > 3
    assert cli.main(["eval", str(trained_run), "--text", str(tmp_path / "none*.py")]) == 2


def test_keel_generate_prints_continuations_and_speeds(trained_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("class Foo\n\n")  # the end-of-run sample's shapes: compiled once for both tests
    capsys.readouterr()
    argv = ["generate", str(trained_run), "--prompts", str(prompts), "--max-new-tokens", "64", "--seed", "3",
            "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["outputs"]) == 1 and out["outputs"][0].startswith("class Foo")
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == out["outputs"]  # the seed fixes the text
    defaults = cli.build_parser().parse_args(["generate", "x", "--prompt", "a"])
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (
        READABLE.temperature, READABLE.top_k, READABLE.top_p)  # the command samples as the end-of-run sample


def _closing_samples(run_dir, seeds):
    from keel.evaluate.run import open_run

    run = open_run(run_dir)
    prompt = run.encode_prompt(run.cfg.train.sample_prompt)
    return [run.cfg.train.sample_prompt + run.tokenizer.decode(
        readable_sample(run.params, prompt, 64, run.cfg.model, run.eos_id, seed=seed)) for seed in seeds]


def test_the_closing_sample_does_not_loop_on_a_tiny_run(trained_run):
    """The criterion (`SampleQuality.reads_like_python`): no piece of text with a letter in it repeated more
    than 3 times back to back, and at least 80% of the non-empty lines read by Python's `tokenize` without an
    error token. A 12-step model of width 32 writes near-random tokens, so here only the loop half is asked
    for (over three seeds); the whole criterion is checked on the default run by `benchmarks/default_sample.py`
    (it takes a default run: minutes; the default run's greedy sample fails it: `self.x = self.x` seven times)."""
    for text in _closing_samples(trained_run, range(3)):
        assert sample_quality(text).longest_loop <= 3, text


def test_heldout_bits_per_byte_for_the_end_of_run_summary(trained_run):
    from keel.config import load_saved_config
    from keel.data.prepare import prepare_data
    from keel.evaluate.bpb import bits_per_byte, eval_set_bytes, heldout_bits_per_byte

    cfg = load_saved_config(trained_run / "config.yaml")
    data = prepare_data(cfg, trained_run, log=lambda line: None)
    overall, by_source = heldout_bits_per_byte(data, {"corpus": 5.0}, cfg.train.eval_batches)
    tokens, n_bytes = eval_set_bytes(data.eval_sets(cfg.train.eval_batches)["corpus"],
                                     token_bytes(data.tokenizer, cfg.model.vocab_size), data.bos_id, data.pad_id)
    assert tokens > 0 and n_bytes > tokens  # a BPE token stands for more than one byte on average
    assert overall == by_source["corpus"] == pytest.approx(bits_per_byte(5.0, tokens, n_bytes))
