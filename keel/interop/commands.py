"""`keel export RUN_DIR --hf OUT` and `keel import HF_DIR --run-dir RUN` (docs/models.md)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from keel.errors import CheckpointError, ConfigError

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# keel's own parameters keys that only say how to run the model, which `keel import` leaves to the config
RUN_CHOICES = ("model.remat", "model.param_dtype", "model.compute_dtype", "model.attention")
IMPORTED = "imported.json"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face Gemma-3 model directory",
                       description="Write a run's latest (or --step) checkpoint as a transformers Gemma3ForCausalLM "
                                   "directory: config.json, safetensors (sharded with an index above "
                                   "--max-shard-size), the tokenizer files and generation_config.json.")
    e.add_argument("run_dir", help="a keel run directory")
    e.add_argument("--hf", required=True, metavar="OUT", help="the directory to write (must not exist, or be empty)")
    e.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    e.add_argument("--dtype", choices=EXPORT_DTYPES,
                   help="type of the exported weights (default: the run's model.param_dtype, exact)")
    e.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")

    i = sub.add_parser("import", help="turn a Hugging Face Gemma-3 checkpoint into a keel run at step 0",
                       description="Read a gemma3_text checkpoint (config.json, safetensors, tokenizer.json) and "
                                   "write a run directory whose checkpoint at step 0 holds its weights: "
                                   "`keel train --config RUN/config.yaml` then trains from them. The training "
                                   "settings come from --config and the overrides; the model from the checkpoint.")
    i.add_argument("hf_dir", help="a Hugging Face model directory (Gemma3ForCausalLM, or the text part of a "
                                  "Gemma3ForConditionalGeneration)")
    i.add_argument("--run-dir", required=True, help="the run directory to create")
    i.add_argument("--config", action="append", help="presets or YAML files for the training settings (default tiny)")
    i.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=1000")


def _fresh_directory(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file; keel writes a new directory there")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{what} {path} already exists and is not empty; keel writes only into a new directory")


@contextmanager
def _built_beside(out: Path) -> Iterator[Path]:
    """A fresh `.OUT.partial` folder beside OUT to build in, renamed to OUT (new, or empty) when the block ends
    without an error, removed when it raises: OUT is complete or absent."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create a directory there ({e.strerror or e})") from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # a full disk, a file-size limit
            raise CheckpointError(f"writing {out} failed ({e}); nothing was left there") from e
        raise
    if out.exists():
        out.rmdir()  # empty: `_fresh_directory` checked
    tmp.rename(out)


def run_export(args: argparse.Namespace) -> int:
    import numpy as np

    from keel.evaluate.run import open_run
    from keel.interop import files, hf
    from keel.model.sampling import READABLE

    out = Path(args.hf)
    _fresh_directory(out, "--hf")
    max_bytes = files.parse_size(args.max_shard_size)
    if (Path(args.run_dir) / "config.json").exists() and not (Path(args.run_dir) / "config.yaml").exists():
        raise ConfigError(f"{args.run_dir} is already a Hugging Face model directory; keel export reads keel runs")
    run = open_run(args.run_dir, args.step)
    cfg = run.cfg
    hf.check_exportable(cfg.model)
    dtype = args.dtype or cfg.model.param_dtype
    tensors = {k: v.astype(np.dtype(dtype)) for k, v in hf.to_hf_tensors(run.params, cfg.model).items()}
    tok = run.tokenizer
    names = {i: tok.id_to_token(i) for i in (run.pad_id, run.bos_id, run.eos_id)}
    config = hf.to_hf_config(cfg.model, max_position_embeddings=cfg.data.seq_len, pad_id=run.pad_id,
                             bos_id=run.bos_id, eos_id=run.eos_id, dtype=dtype)
    # written beside OUT, then renamed: an interrupted export leaves no half-written model directory behind
    generation = files.generation_config(bos_id=run.bos_id, pad_id=run.pad_id, eos_id=run.eos_id,
                                         temperature=READABLE.temperature, top_p=READABLE.top_p,
                                         max_length=cfg.data.seq_len)
    with _built_beside(out) as tmp:
        written = files.write_safetensors(tmp, tensors, max_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files.write_tokenizer(tmp, tok, pad=names[run.pad_id], bos=names[run.bos_id], eos=names[run.eos_id],
                              max_length=cfg.data.seq_len)
    total = sum(t.nbytes for t in tensors.values())
    print(f"exported step {run.step} of {run.run_dir} to {out}: {len(tensors)} tensors, {total / 2**20:,.1f} MiB "
          f"{dtype} in {', '.join(written)}; config.json (gemma3_text), generation_config.json, "
          f"{', '.join(files.TOKENIZER_FILES)}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from keel.config import dump_yaml, fingerprint, flatten, load_config, parse_override, validate
    from keel.interop import files, hf
    from keel.io import atomic_write
    from keel.optim.optimizers import build_optimizer
    from keel.train.checkpoint import Checkpointer
    from keel.train.spikes import init_monitor
    from keel.train.state import TrainState, abstract_state

    hf_dir, run_dir = Path(args.hf_dir), Path(args.run_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir}: not a directory")
    _fresh_directory(run_dir, "--run-dir")
    for o in args.overrides:
        for key in flatten(parse_override(o)):
            if key.startswith("model.") and key not in RUN_CHOICES:
                raise ConfigError(f"{o}: the model's shape comes from {hf_dir / 'config.json'}; of model.* only "
                                  f"{', '.join(RUN_CHOICES)} can be set")
            if key in ("run_dir", "data.tokenizer"):
                raise ConfigError(f"{o}: keel import sets {key} (--run-dir, and the checkpoint's tokenizer copied "
                                  f"into it)")
    base = load_config(args.config or ["tiny"], args.overrides)
    hf_config, imported = files.read_model(hf_dir)
    model = hf.with_model(base.model, imported)
    for note in hf.import_notes(hf_config):
        print(f"keel import: note: {note}")
    tokenizer_path = run_dir.resolve() / "tokenizer.json"
    cfg = validate(replace(base, run_dir=str(run_dir), model=model,
                           data=replace(base.data, tokenizer=str(tokenizer_path))))
    tok, params = files.read_weights(hf_dir, hf_config, model, model.param_dtype)
    tx = build_optimizer(cfg)[0]
    params = jax.tree.map(jnp.asarray, params)
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), init_monitor(cfg.spike))
    expected = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_state(cfg, tx))
    if jax.tree.map(lambda a: (a.shape, a.dtype), state) != expected:
        raise ConfigError(f"{hf_dir}: the converted state does not have the shapes of the model it describes")
    source = {"hf_dir": str(hf_dir.resolve()), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": hf_config}
    meta = {"run_fingerprint": fingerprint(cfg), "data_fingerprint": "", "data": {}, "skip_steps": [],
            "imported_from": source["hf_dir"]}
    # built beside RUN and renamed when complete: a failed or interrupted import leaves no half-made run directory
    with _built_beside(run_dir) as tmp:
        atomic_write(tmp / "tokenizer.json", tok.to_str())
        ckpt = Checkpointer(tmp / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
        try:
            ckpt.save(0, state, meta)
            ckpt.wait()
        finally:
            ckpt.close()
        atomic_write(tmp / "config.yaml", dump_yaml(cfg))
        atomic_write(tmp / IMPORTED, json.dumps(source, indent=1) + "\n")
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"imported {hf_dir} ({n:,} parameters, {model.n_layers} layers, d_model {model.d_model}) into "
          f"{run_dir} at step 0\ntrain from it: keel train --config {run_dir / 'config.yaml'}")
    return 0

