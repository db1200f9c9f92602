"""keel against `transformers` on a real run: export it, load the export with `Gemma3ForCausalLM`, and compare.

Needs torch and transformers next to keel (a development environment; the test suite needs neither):

    pip install torch transformers          # CPU builds are enough
    python benchmarks/hf_parity.py RUN_DIR [--step N] [--windows 8] [--new-tokens 48]

Measures, in float32 on the CPU:
- logits over `--windows` held-out windows of the run's own data: max |keel - transformers| relative to the
  largest logit, and the share of positions whose argmax agrees;
- the loss of each on the same targets;
- the exported tokenizer through AutoTokenizer: the same ids as keel's (<bos> first) and the text back;
- a greedy continuation of the run's sample prompt: keel's KV-cache decoder (`keel generate`'s) against
  transformers' `generate` (do_sample=False), token by token.
Prints a table; `--json` one object. docs/models.md records a run of it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--step", type=int)
    p.add_argument("--windows", type=int, default=8, help="held-out windows of data.seq_len tokens")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from keel import cli
    from keel.data.prepare import open_sources
    from keel.evaluate.run import open_run
    from keel.model.generate import Sampling, generate
    from keel.model.transformer import forward

    run = open_run(args.run_dir, args.step)
    cfg = run.cfg
    T = cfg.data.seq_len
    split = open_sources(cfg, run.run_dir, log=lambda line: None)[0].store.split("heldout")
    n = min(args.windows, split.n_tokens // (T + 1))
    tokens = split.tokens(0, n * (T + 1)).reshape(n, T + 1).astype(np.int64)
    inputs, targets = tokens[:, :T], tokens[:, 1:]
    positions = np.broadcast_to(np.arange(T), inputs.shape)

    out = Path(tempfile.mkdtemp(prefix="keel-parity-")) / "hf"
    assert cli.main(["export", str(run.run_dir), "--hf", str(out), *(["--step", str(args.step)] if args.step
                                                                      else [])]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                              attn_implementation="eager").eval()

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def parity(x):\n    return x  # ünïcode"
    tokenizer_equal = hf_tokenizer(text).input_ids == run.encode_prompt(text) and \
        hf_tokenizer.decode(hf_tokenizer(text).input_ids, skip_special_tokens=True) == text

    ids = jnp.asarray(inputs, jnp.int32)
    keel_logits = np.asarray(forward(run.params, ids, jnp.ones_like(ids), jnp.asarray(positions, jnp.int32),
                                     cfg.model))
    with torch.no_grad():
        hf_logits = model(input_ids=torch.from_numpy(inputs)).logits.float().numpy()

    def loss(logits: np.ndarray) -> float:
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return float((logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]).mean())

    rel = float(np.abs(keel_logits - hf_logits).max() / np.abs(hf_logits).max())
    argmax = float((keel_logits.argmax(-1) == hf_logits.argmax(-1)).mean())

    prompt = run.encode_prompt(cfg.train.sample_prompt)
    t0 = time.perf_counter()
    ours = generate(run.params, [prompt], cfg.model, args.new_tokens, Sampling(temperature=0.0), 0, -1).tokens[0]
    keel_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=run.pad_id)[0, len(prompt):].tolist()
    hf_s = time.perf_counter() - t0
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))

    result = {
        "run_dir": str(run.run_dir), "step": run.step, "exported_to": str(out), "windows": n, "seq_len": T,
        "logits_max_rel_diff": rel, "argmax_agreement": argmax, "keel_loss": loss(keel_logits),
        "transformers_loss": loss(hf_logits), "greedy_tokens": args.new_tokens, "greedy_tokens_equal": same,
        "keel_greedy_text": run.tokenizer.decode(ours), "transformers_greedy_text": run.tokenizer.decode(theirs),
        "tokenizer_ids_equal": tokenizer_equal, "keel_generate_s": keel_s, "transformers_generate_s": hf_s,
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"run {result['run_dir']} step {run.step}, {n} held-out windows of {T} tokens, float32 on "
          f"{jax.default_backend()}; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"{'logits: max |keel - transformers| / max |logit|':<52} {rel:.2e}")
    print(f"{'argmax agreement':<52} {argmax:.4%}")
    print(f"{'loss keel / transformers (nats)':<52} {result['keel_loss']:.6f} / {result['transformers_loss']:.6f}")
    print(f"{'greedy continuation: tokens equal before first diff':<52} {same} of {args.new_tokens}")
    print(f"{'AutoTokenizer ids = keel ids (<bos> first), decode':<52} {tokenizer_equal}")
    print(f"greedy text (keel):\n{cfg.train.sample_prompt}{result['keel_greedy_text']}")


if __name__ == "__main__":
    main()
