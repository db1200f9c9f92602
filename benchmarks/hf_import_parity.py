"""`keel import` of a Hugging Face Gemma-3 checkpoint against `transformers` on the same checkpoint.

Needs torch and transformers next to keel (development only):

    python benchmarks/hf_import_parity.py HF_DIR [--tokens 1024] [--new-tokens 16]
    python benchmarks/hf_import_parity.py --random-270m /tmp/g270m      # first writes a random model there

`--random-270m DIR` writes a randomly initialised `Gemma3ForCausalLM` with Gemma-3 270M's dimensions (vocab
262,144, width 640, 18 layers, 4 query heads and 1 KV head of 256, MLP 2,048, window 512 with every 6th layer
global, RoPE 1e6 global / 1e4 local; float32) and a small tokenizer, for when the Hub is out of reach. Then:
`keel import` (timed) into a temporary run directory, the logits of keel's forward of the imported checkpoint
and of transformers (eager attention, float32) on random token ids, longer than the window, and a greedy
continuation of each. Prints one table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

GEMMA3_270M = dict(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768,
                   sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})


def write_random_270m(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_270M)).eval()
    with torch.no_grad():  # norm scales off zero, so that keel's `1 + w` is exercised
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape))
    model.save_pretrained(out, safe_serialization=True)
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(252)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", nargs="?")
    p.add_argument("--random-270m", metavar="DIR", help="write a random Gemma-3-270M-shaped model to DIR and use it")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from keel import cli
    from keel.config import load_saved_config
    from keel.model.generate import Sampling, generate
    from keel.model.transformer import forward
    from keel.train.checkpoint import load_params

    hf_dir = Path(args.random_270m or args.hf_dir)
    if args.random_270m:
        t0 = time.perf_counter()
        write_random_270m(hf_dir)
        print(f"wrote a random Gemma-3-270M-shaped model to {hf_dir} in {time.perf_counter() - t0:.1f}s")
    run_dir = Path(tempfile.mkdtemp(prefix="keel-import-")) / "run"
    t0 = time.perf_counter()
    assert cli.main(["import", str(hf_dir), "--run-dir", str(run_dir)]) == 0
    import_s = time.perf_counter() - t0
    cfg = load_saved_config(run_dir / "config.yaml")
    params, _ = load_params(run_dir, cfg)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(cfg.model.vocab_size, 250), (1, args.tokens)).astype(np.int64)
    ids[:, 0] = 2
    x = jnp.asarray(ids, jnp.int32)
    t0 = time.perf_counter()
    ours = np.asarray(forward(params, x, jnp.ones_like(x), jnp.arange(args.tokens)[None], cfg.model))
    keel_s = time.perf_counter() - t0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    hf_s = time.perf_counter() - t0
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    argmax = float((ours.argmax(-1) == theirs.argmax(-1)).mean())

    prompt = ids[0, :64].tolist()
    ours_greedy = generate(params, [prompt], cfg.model, args.new_tokens, Sampling(temperature=0.0)).tokens[0]
    with torch.no_grad():
        theirs_greedy = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                                       min_new_tokens=args.new_tokens, eos_token_id=None,
                                       pad_token_id=0)[0, len(prompt):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours_greedy, theirs_greedy, strict=False)) if a != b),
                min(len(ours_greedy), len(theirs_greedy)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"{hf_dir}: {n:,} parameters, {cfg.model.n_layers} layers, window {cfg.model.sliding_window} every "
          f"{cfg.model.global_every}th global; jax {jax.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, float32 on {jax.default_backend()}")
    print(f"{'keel import (config, weights, optimizer state, checkpoint)':<60} {import_s:.1f} s")
    print(f"{f'logits over {args.tokens} tokens: max |keel - transformers| / max':<60} {rel:.2e}")
    print(f"{'argmax agreement':<60} {argmax:.4%}")
    print(f"{'greedy continuation: tokens equal before the first diff':<60} {same} of {args.new_tokens}")
    print(f"{'forward time keel (incl. compile) / transformers':<60} {keel_s:.1f} s / {hf_s:.1f} s")


if __name__ == "__main__":
    main()
