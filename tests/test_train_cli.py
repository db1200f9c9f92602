"""The real `keel train` entry point on a tiny config: train, resume, and refuse what would corrupt a run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from keel.cli import main
from keel.config import load_config
from keel.errors import EXIT_CONFIG, EXIT_PREEMPTED
from keel.train.checkpoint import load_params
from keel.train.events import EventLog, read_events


def _run_dir(args):
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("run_dir=")))


def _train(args, *extra):
    return main(["train", "--no-progress", *args, *extra])


def test_train_end_to_end(tiny_args, capsys):
    assert _train(tiny_args, "train.steps=30", "train.eval_every=15", "optim.warmup_steps=3", "optim.lr=1e-2",
                  "train.sample_tokens=8") == 0
    out = capsys.readouterr().out
    for words in ("held-out loss", "held-out bits/byte", "unigram entropy", "tokens seen", "wall time",
                  "sample (temperature"):
        assert words in out
    run = _run_dir(tiny_args)
    assert (run / "tokenizer.json").exists() and (run / "config.yaml").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_rows] == list(range(1, 31))
    assert all(np.isfinite(m["loss"]) and m["tokens_per_s"] > 0 and m["mfu"] > 0 for m in train_rows)
    heldout = [m for m in metrics if "heldout_loss" in m]
    assert [m["step"] for m in heldout] == [15, 30]
    first, last = (np.mean([m["loss"] for m in train_rows[s]]) for s in (slice(0, 5), slice(-5, None)))
    assert last < first - 0.5, (first, last)
    assert heldout[1]["heldout_loss"] < heldout[0]["heldout_loss"]
    events = read_events(run / "events" / "host0000.jsonl")
    kinds = [e["kind"] for e in events]
    for k in ("start", "data_prepare", "init", "compile", "step", "checkpoint_save", "eval", "end"):
        assert k in kinds, k
    assert kinds.count("step") == 30
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 30 and summary["tokens_seen"] == 30 * 8 * 32 and summary["reason"] == "done"
    # Step times come from when each step's metrics became readable (one step late, no per-step sync): they
    # are positive, in step order, and leave out the compile, evaluation and checkpoint work between steps.
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31)) and all(e["duration_s"] > 0 for e in steps)
    first, last = next(e for e in events if e["kind"] == "compile"), next(e for e in events if e["kind"] == "end")
    other = sum(e["duration_s"] for e in events if e["kind"] in ("eval", "checkpoint_save"))
    assert sum(e["duration_s"] for e in steps) <= last["t_mono"] - first["t_mono"] - other + 1e-3
    assert [m["step_s"] for m in train_rows] == pytest.approx([e["duration_s"] for e in steps])


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_args, tmp_path):
    whole = [a for a in tiny_args if not a.startswith("run_dir=")] + [f"run_dir={tmp_path / 'whole'}"]
    parts = [a for a in tiny_args if not a.startswith("run_dir=")] + [f"run_dir={tmp_path / 'parts'}"]
    assert _train(whole) == 0
    assert _train(parts, "train.stop_at=3") == 0
    cfg = load_config("tiny", parts)
    params_3, step = load_params(tmp_path / "parts", cfg)
    assert step == 3
    assert _train(parts) == 0  # the same command again: resumes at 3 and finishes
    events = read_events(tmp_path / "parts" / "events" / "host0000.jsonl")
    assert [e["step"] for e in events if e["kind"] == "checkpoint_restore"] == [3]
    # the second process is attempt 2, and says how attempt 1 ended (never inferred from repeated steps)
    assert [e["attempt"] for e in events if e["kind"] == "start"] == [1, 2]
    restart = next(e for e in events if e["kind"] == "restart")
    assert (restart["attempt"], restart["previous_attempt"], restart["previous_ending"]) == (2, 1, "stop_at")
    assert restart["gap_s"] >= 0 and all("step_start_time" in e for e in events if e["kind"] == "step")
    a, step_a = load_params(tmp_path / "whole", cfg)
    b, step_b = load_params(tmp_path / "parts", cfg)
    assert step_a == step_b == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(params_3),
                                                          strict=True))


def test_resume_with_a_changed_config_is_refused(tiny_args, capsys):
    assert _train(tiny_args, "train.stop_at=2") == 0
    capsys.readouterr()
    assert _train(tiny_args, "model.mlp_dim=96") == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.mlp_dim: 64 -> 96" in err and "--allow-config-change" in err
    # observation-only keys may change
    assert _train(tiny_args, "train.log_every=2") == 0


def test_resume_with_changed_data_says_what_changed(tiny_args, small_corpus, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(Path(small_corpus).parent, corpus)
    args = [a for a in tiny_args if not a.startswith("data.corpus=")] + [f"data.corpus={corpus}/*.py"]
    assert _train(args, "train.stop_at=2") == 0
    run = _run_dir(tiny_args)
    # Same config, different corpus content: the store's fingerprint in the checkpoint no longer matches.
    (corpus / "abc.py").write_text("x = 1\n" * 50)
    capsys.readouterr()
    assert _train(args) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "data sources.corpus.store:" in err and "--allow-config-change" in err
    assert (run / "checkpoints" / "2").exists()  # nothing was deleted
    assert _train(args, "--allow-config-change") == 0


def test_skip_list_skips_steps_and_guards_trained_ones(tiny_args, capsys):
    assert _train(tiny_args, "train.stop_at=2") == 0
    capsys.readouterr()
    assert _train(tiny_args, "data.skip_steps=[0-1]") == EXIT_CONFIG
    assert "steps already trained" in capsys.readouterr().err
    assert _train(tiny_args, "data.skip_steps=[3-4]") == 0
    run = _run_dir(tiny_args)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 6]
    skips = [e for e in read_events(run / "events" / "host0000.jsonl") if e["kind"] == "data_skip"]
    assert [(e["start"], e["stop"]) for e in skips] == [(3, 5)]


def test_skipping_the_last_steps_still_ends_the_run(tiny_args, capsys):
    # (and train.sample_tokens=0 means no closing sample at all)
    assert _train(tiny_args, "train.steps=4", "data.skip_steps=[2-3]", "train.sample_tokens=0") == 0  # not 143
    run = _run_dir(tiny_args)
    assert (run / "checkpoints" / "4").exists()
    skips = [e for e in read_events(run / "events" / "host0000.jsonl") if e["kind"] == "data_skip"]
    assert [(e["start"], e["stop"]) for e in skips] == [(2, 4)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["sample"] is None
    assert "sample (" not in capsys.readouterr().out


def test_corrupt_checkpoint_names_the_path_and_keeps_it(tiny_args, capsys):
    """A corrupt latest checkpoint no longer stops the run: it is moved aside (kept, and named in the output and
    the events) and the run resumes from the checkpoint before it (tests/test_checkpoint_recovery.py: the rest)."""
    assert _train(tiny_args, "train.stop_at=4") == 0
    run = _run_dir(tiny_args)
    latest = run / "checkpoints" / "4"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "state" in str(f) and not f.name.startswith("_"):
            f.write_bytes(b"\0garbage" * 3)
    capsys.readouterr()
    assert _train(tiny_args) == 0
    out = capsys.readouterr().out
    [kept] = (run / "checkpoints_aside").iterdir()
    assert kept.name.startswith("4-")  # kept as it was found
    assert any(f.is_file() and f.read_bytes() == b"\0garbage" * 3 for f in kept.rglob("*"))
    assert f"moved it to {kept}" in out and "resumed from checkpoint at step 2" in out
    events = read_events(run / "events" / "host0000.jsonl")
    fallback = next(e for e in events if e["kind"] == "checkpoint_fallback")
    assert (fallback["step"], fallback["moved_to"], fallback["attempt"]) == (4, str(kept), 2)
    restore = next(e for e in events if e["kind"] == "checkpoint_restore")
    assert (restore["step"], restore["skipped"]) == (2, [4])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]  # 4 trained again


def test_dry_run_counts_rnj1_through_the_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "keel", "train", "--config", "rnj1-8b", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = load_config("rnj1-8b").model
    L, D, H, K, Dh, F, V = m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
    # tied embedding + final norm; per layer 4 norms of D, q/k norms of Dh, q and o, k and v, GeGLU's three
    n = V * D + D + L * (4 * D + 2 * Dh + 2 * D * H * Dh + 2 * D * K * Dh + 3 * D * F)
    assert f"parameters:        {n:,} " in out.stdout
    # float32: params; Muon's momentum for the layers' matrices; AdamW's mu and nu for the embedding and norms
    matrices = L * (2 * D * H * Dh + 2 * D * K * Dh + 3 * D * F)
    assert f"train state:       {4 * (n + matrices + 2 * (n - matrices)) / 2**30:.2f} GiB" in out.stdout


def test_config_error_exits_before_any_work(tmp_path, capsys):
    assert main(["train", f"run_dir={tmp_path / 'r'}", "model.n_kv_heads=3"]) == EXIT_CONFIG
    assert "model.n_kv_heads=3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("mesh, replicated", [
    (["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"],
     ["params/layers/wk dim 2 (kv_heads=2) is not divisible by tensor=4"]),
    pytest.param(["mesh.data=1", "mesh.fsdp=-1"], [], marks=pytest.mark.slow),  # tests/test_parallel.py's fsdp
])
def test_other_meshes_train_and_say_what_they_replicate(tiny_args, mesh, replicated, capsys):
    assert _train(tiny_args, *mesh, "train.steps=2", "optim.warmup_steps=1", "train.eval_every=2") == 0
    compile_event = next(e for e in read_events(_run_dir(tiny_args) / "events" / "host0000.jsonl")
                         if e["kind"] == "compile")
    notes = compile_event.get("sharding_notes", [])
    out = capsys.readouterr().out
    for expected in replicated:
        assert any(n.startswith(expected) for n in notes), notes
        assert f"sharding: {expected}" in out
    if not replicated:
        assert not notes and "sharding:" not in out


def test_train_on_a_mixture_of_built_stores(tiny_args, small_corpus, tmp_path):
    files = sorted(Path(small_corpus).parent.glob("*.py"))
    for name, part in (("a", files[:20]), ("b", files[20:])):
        (tmp_path / name).mkdir()
        for f in part:
            shutil.copy(f, tmp_path / name / f.name)
    build = ["data", "build", "--jobs", "1", "--no-progress", "--heldout-fraction", "0.2"]
    assert main([*build, str(tmp_path / "a" / "*.py"), "--out", str(tmp_path / "sa"), "--vocab-size", "512"]) == 0
    assert main([*build, str(tmp_path / "b" / "*.py"), "--out", str(tmp_path / "sb"),
                 "--tokenizer", str(tmp_path / "sa" / "tokenizer.json")]) == 0
    sources = f"[{{name: a, path: '{tmp_path / 'sa'}', weight: 0.75}}, {{name: b, path: '{tmp_path / 'sb'}'}}]"
    assert _train(tiny_args, f"data.sources={sources}", "train.steps=3", "optim.warmup_steps=1",
                  "train.eval_every=3") == 0
    rows = [json.loads(line) for line in (_run_dir(tiny_args) / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "heldout_loss" in r][-1]
    by = final["heldout_loss_by_source"]
    assert set(by) == {"a", "b"}
    assert final["heldout_loss"] == pytest.approx((0.75 * by["a"] + 1.0 * by["b"]) / 1.75)
    assert set(rows[0]["epochs"]) == {"a", "b"}


def test_sigterm_checkpoints_within_a_step_and_exits_143_without_eval_or_sample(tiny_args):
    """A preempted job has seconds: after SIGTERM keel saves the next step and exits 143 — no held-out
    evaluation, no sample — and the run resumes from that checkpoint."""
    run = _run_dir(tiny_args)
    log = run.parent / "preempt.log"
    args = [*tiny_args, "train.steps=400", "train.eval_every=200", "checkpoint.every=200", "train.log_every=50",
            "train.sample_tokens=8"]  # a sample that a finished run would print
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "keel", "train", "--no-progress", *args],
                                stdout=out, stderr=subprocess.STDOUT)
        events_path = run / "events" / "host0000.jsonl"
        seen = 0
        deadline = time.monotonic() + 120
        while seen < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if events_path.exists():
                seen = max([e["step"] for e in read_events(events_path) if e["kind"] == "step"], default=0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == EXIT_PREEMPTED, log.read_text()
    events = read_events(events_path)
    kinds = [e["kind"] for e in events]
    preempted = events[kinds.index("preempted")]
    # the step the host had reported, the one in flight, and the one dispatched before the flag was seen
    assert seen <= preempted["step"] <= seen + 2, (seen, preempted)
    assert (run / "checkpoints" / str(preempted["step"])).exists()
    after = kinds[kinds.index("preempted"):]
    assert "eval" not in after and "step" not in after
    assert "sample (temperature" not in log.read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reason"] == "signal" and summary["step"] == preempted["step"]
    assert summary["sample"] is None and summary["heldout_loss"] is None  # strict JSON: null, not NaN
    assert _train(args, "train.stop_at=" + str(preempted["step"] + 1)) == 0  # resumes where it stopped
    restored = [e["step"] for e in read_events(events_path) if e["kind"] == "checkpoint_restore"]
    assert restored == [preempted["step"]]


def test_trainer_feeds_the_step_batch_after_skipped_steps(tiny_args):
    """With steps 3-4 skipped, the update after step 2 trains on the batch of step 5 (not 3), from the
    parameters after step 2, and the steps before the skip are the plain run's, bitwise."""
    from keel.data.pack import expand
    from keel.data.prepare import prepare_data
    from keel.model import transformer

    plain = [a for a in tiny_args if not a.startswith("run_dir=")] + [f"run_dir={_run_dir(tiny_args)}-plain"]
    assert _train(plain, "train.stop_at=3", "checkpoint.every=3") == 0
    assert _train(tiny_args, "data.skip_steps=[3-4]") == 0
    cfg = load_config("tiny", tiny_args)
    params_3, _ = load_params(Path(f"{_run_dir(tiny_args)}-plain"), cfg, step=3)
    rows = {r["step"]: r for r in map(json.loads, (_run_dir(tiny_args) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    plain_rows = {r["step"]: r for r in map(json.loads, (Path(f"{_run_dir(tiny_args)}-plain") / "metrics.jsonl")
                                           .read_text().splitlines()) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 6]
    assert [rows[s]["loss"] for s in (1, 2, 3)] == [plain_rows[s]["loss"] for s in (1, 2, 3)]
    data = prepare_data(cfg, _run_dir(tiny_args), log=lambda s: None)
    batch = data.global_batch(5)
    full = expand(batch["tokens"], batch["first_position"], data.bos_id, data.pad_id)
    loss, _ = transformer.loss_fn(params_3, full, cfg.model)
    assert float(loss) == pytest.approx(rows[6]["loss"], rel=1e-5)
    other = data.global_batch(3)
    full3 = expand(other["tokens"], other["first_position"], data.bos_id, data.pad_id)
    assert float(transformer.loss_fn(params_3, full3, cfg.model)[0]) != pytest.approx(rows[6]["loss"], rel=1e-5)


def test_sigterm_during_start_up_exits_143_before_any_step(tiny_args):
    """Before the first step there is nothing new to save: a signal during data preparation, restore or
    compilation stops the process at the next phase boundary with the preemption code and a `preempted`
    event, before any step (and without crashing on the way out)."""
    run = _run_dir(tiny_args)
    events_path = run / "events" / "host0000.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "keel", "train", "--no-progress", *tiny_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (
            events_path.exists() and any(e["kind"] == "start" for e in read_events(events_path))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "keel: preempted: signal 15" in err
    kinds = [e["kind"] for e in read_events(events_path)]
    assert "preempted" in kinds and "step" not in kinds and "failure" not in kinds


def test_a_second_process_on_the_same_run_directory_is_refused(tiny_args, capsys):
    from keel.io import exclusive

    run = _run_dir(tiny_args)
    with exclusive(run / ".lock-host0000", "the run directory"):  # as a first `keel train` would hold it
        assert _train(tiny_args) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"is in use by pid {os.getpid()}" in err and "two processes must not train one run directory" in err
    assert not (run / "config.yaml").exists() and not (run / "events").exists()  # refused before writing
    assert _train(tiny_args, "train.steps=2", "optim.warmup_steps=1", "train.eval_every=2") == 0  # lock released


def test_restart_reads_how_the_previous_attempt_ended(tmp_path):
    path = tmp_path / "host0000.jsonl"
    first = EventLog(path)
    assert (first.attempt, first.previous) == (1, None)
    first.emit("start")
    first.emit("step", step=1)
    first.close()
    with open(path, "a") as f:
        f.write('{"kind": "step", "step": 2, "att')  # the line a SIGKILL cut
    second = EventLog(path)
    assert (second.attempt, second.previous_ending()) == (2, "killed")
    second.emit("end", reason="stop_at")
    second.close()
    third = EventLog(path)
    assert (third.attempt, third.previous_ending()) == (3, "stop_at")
    third.emit("failure", reason="non_finite_loss")
    third.close()
    assert EventLog(path).previous_ending() == "non_finite_loss"
    kinds = [(e["kind"], e["attempt"]) for e in read_events(path)]  # the cut line is left out, nothing else
    assert kinds == [("start", 1), ("step", 1), ("end", 2), ("failure", 3)]
