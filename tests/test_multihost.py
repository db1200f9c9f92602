"""Two processes on localhost (CPU collectives through gloo): `keel train` trains exactly like one process,
`keel burnin` compares hashes across hosts, `model.attention=auto` makes one choice for all."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keel.cli import main
from tests.conftest import TINY

ARGS = ["train.steps=4", "train.eval_every=4", "optim.warmup_steps=1", "checkpoint.every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["heldout_loss"] for r in rows if "heldout_loss" in r]


@pytest.mark.slow  # a reference run, then a run of two fresh processes that each compile everything
def test_two_processes_equal_one(small_corpus, store_cache, tmp_path):
    common = [*TINY, *ARGS, f"data.corpus={small_corpus}"]
    one = [*common, f"data.cache_dir={store_cache}", f"run_dir={tmp_path / 'one'}"]
    assert main(["train", "--no-progress", *one]) == 0
    # the two processes build their own store: host 0 builds it in the shared run_dir, host 1 waits for it

    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-m", "keel", "train", "--no-progress", *common,
                          f"run_dir={tmp_path / 'two'}"], cwd=root, env=dict(env, JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "held-out loss" in outs[0] and "held-out loss" not in outs[1]  # host 0 reports
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    np.testing.assert_allclose(two[0], one[0], rtol=2e-5)
    np.testing.assert_allclose(two[1], one[1], rtol=2e-5)
    events = sorted(p.name for p in (tmp_path / "two" / "events").iterdir())
    assert events == ["host0000.jsonl", "host0001.jsonl"]
    assert (tmp_path / "two" / "checkpoints" / "4").exists()


def test_burnin_compares_hashes_across_hosts(tmp_path):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-m", "keel", "burnin", "--quick", "--checks", "sdc", "--no-progress",
                          "--json", str(tmp_path / f"host{i}.json")], cwd=root, env=dict(env, JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    for i in range(2):
        report = json.loads((tmp_path / f"host{i}.json").read_text())
        assert len(report["devices"]) == 4
        hashes = [m for m in report["measurements"] if m["check"] == "sdc"]
        assert len(hashes) == 4 and len({m["value"] for m in hashes}) == 1
        assert all(m["note"] == "agrees with 8 of 8 devices" for m in hashes)  # both hosts' devices compared


AUTO_SCRIPT = """
import os, sys, jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from keel.kernels import autotune
from keel.model.transformer import attention_implementations
pid = jax.process_index()
autotune.candidates = lambda platform, case: ["pallas", "xla"]
autotune.check = lambda fn, case: None
impls = attention_implementations()
prefer = impls["xla"] if pid == 0 else impls["pallas"]  # the processes disagree on what is fastest
autotune.measure = lambda fn, case, reps=3: print("measured", flush=True) or (1.0 if fn is prefer else 2.0)
case = autotune.Case((1, 16, 2, 8), (1, 16, 1, 8), "float32", 0.0, None, ((0, 2),))
print("chose", autotune.choose(case, impls), flush=True)
"""


def test_auto_attention_is_process_zeros_choice_on_every_process(tmp_path):
    """model.attention=auto in a multi-process run: process 0 measures, the others do not, and all compile what
    process 0 chose, even where their own measurement (or disk cache) would differ."""
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, "-c", AUTO_SCRIPT, str(port), str(i)], cwd=root,
                              env=dict(env, KEEL_CACHE_DIR=str(tmp_path / str(i))),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "chose xla" in out, out[-3000:]
    assert outs[0].count("measured") == 2 and "measured" not in outs[1]
