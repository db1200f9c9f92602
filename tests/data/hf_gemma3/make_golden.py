"""Write the golden Gemma-3 checkpoints tests/test_hf_interop.py checks `keel import` against.

Run once, where torch and transformers are installed (never by the test suite, which needs neither):

    python tests/data/hf_gemma3/make_golden.py

Each case is a tiny random `Gemma3ForCausalLM` (save_pretrained: config.json, model.safetensors), a small
WordLevel tokenizer.json, and golden.npz: input ids, position ids and the float32 logits transformers computes
for them (eager attention). The weights are drawn wider than transformers' own init (norm scales too, so that
`1 + w` matters; embeddings at std 1, so the softcaps bite). Versions go to VERSIONS.json.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

HERE = Path(__file__).parent
VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
              hidden_activation="gelu_pytorch_tanh", attn_implementation="eager")
CASES = {
    # three layers, the third global; local window 8 over 24 tokens; keel's defaults for the scale
    "sliding": dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    sliding_window=8, query_pre_attn_scalar=16, tie_word_embeddings=True,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    # YaRN on the global layer, a final-logit softcap, a scale that is not head_dim's, untied output matrix; and an
    # attention softcap, which transformers' Gemma3 reads but does not apply (keel's import follows transformers)
    "yarn": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=6,
                 query_pre_attn_scalar=24, tie_word_embeddings=False, attn_logit_softcapping=3.0,
                 final_logit_softcapping=8.0, max_position_embeddings=16384,
                 rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                                     "beta_slow": 1.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}}),
}


def tokenizer() -> Tokenizer:
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:  # norm scales, applied as 1 + w
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # (out, in)
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, VOCAB, size=(2, 24)).astype(np.int64)
    input_ids[:, 0] = 2  # <bos>
    # row 1 starts at position 3000: YaRN's scaled frequencies turn visibly only far from 0
    position_ids = np.stack([np.arange(24), 3000 + np.arange(24)]).astype(np.int64)
    for seed, (name, fields) in enumerate(CASES.items()):
        out = HERE / name
        out.mkdir(exist_ok=True)
        config = Gemma3TextConfig(**COMMON, **fields)
        model = Gemma3ForCausalLM(config).eval()
        randomize(model, seed)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer().save(str(out / "tokenizer.json"))
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
                           attention_mask=torch.ones_like(torch.from_numpy(input_ids))).logits
        np.savez(out / "golden.npz", input_ids=input_ids, position_ids=position_ids,
                 logits=logits.float().numpy())
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, logits std "
              f"{logits.std().item():.3f}")
    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
                "script": "tests/data/hf_gemma3/make_golden.py"}
    (HERE / "VERSIONS.json").write_text(json.dumps(versions, indent=1) + "\n")


if __name__ == "__main__":
    main()
