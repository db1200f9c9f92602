"""The parts of the loop that watch a run, each deciding its own cadence: `StepLogger` (metrics, step events,
the progress bar), `Evaluator` (held-out loss) and `Stopper` (end of the plan, `train.stop_at`, a signal).

The step path never waits for the device: `StepLogger` reads a step's metrics when the next step has been
dispatched, so the host stays one step ahead. A step's time is the interval between the moments two
consecutive steps' metrics became readable, which is the device's completion time whenever the host is ahead
(and the host's time when it is not: then the host is the bottleneck, and that is the step's real cost).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax
from tqdm import tqdm

from keel.config import Config
from keel.errors import NonFiniteLoss, Preempted
from keel.io import atomic_write
from keel.train.events import EventLog, json_number
from keel.train.plan import StepPlan
from keel.train.run import Metrics, Run
from keel.train.spikes import SpikeWatch


def metrics_writer(run_dir: Path, host: int, start: int = 0) -> TextIO:
    """metrics.jsonl, line-buffered, continuing at step `start`; host 0 writes the run's metrics, the others
    write nowhere. Lines of steps after `start` (computed by an attempt whose progress was lost) move to
    metrics.superseded.jsonl first, so metrics.jsonl never holds a step twice and nothing is thrown away."""
    if host != 0:
        return open(os.devnull, "a")  # noqa: SIM115
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept, later = [], []
        for line in path.read_text().splitlines(keepends=True):
            try:
                step = json.loads(line).get("step", 0)
            except ValueError:  # a line a crash cut
                later.append(line if line.endswith("\n") else line + "\n")
                continue
            (later if step > start else kept).append(line)
        if later:
            with open(run_dir / "metrics.superseded.jsonl", "a") as f:
                f.writelines(later)
            atomic_write(path, "".join(kept))
    return open(path, "a", buffering=1)  # noqa: SIM115


@dataclass
class _Pending:
    step: int  # the step count after this step
    metrics: Metrics
    data_wait_s: float


class StepLogger:
    """Per-step events, metrics.jsonl every `train.log_every` steps, and the progress bar; one step late."""

    def __init__(self, cfg: Config, events: EventLog, metrics: TextIO, bar: tqdm, flops_per_step: float,
                 peak_flops: float, epochs: Callable[[int], dict[str, float]], spikes: SpikeWatch,
                 beat: Callable[[int, float], None] = lambda step, seconds: None):
        self.cfg, self.events, self.metrics, self.bar = cfg, events, metrics, bar
        self.spikes, self.beat = spikes, beat
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.epochs = epochs
        self.last_loss = float("nan")
        self._pending: _Pending | None = None
        self._clock = time.perf_counter()

    def on_step(self, step: int, metrics: Metrics, data_wait_s: float) -> None:
        """Record the step that ended at count `step`, and report the one before it (now likely complete)."""
        self._report()
        self._pending = _Pending(step, metrics, data_wait_s)

    def on_skip(self, start: int, stop: int) -> None:
        self.events.emit("data_skip", start=start, stop=stop)
        self.bar.update(stop - start)

    @contextmanager
    def paused(self, last: bool = False) -> Iterator[None]:
        """Around work that is not a step (evaluation, checkpoint): report the last step first (in
        metrics.jsonl whatever `train.log_every` says if it is the `last` of this process), and do not count
        the work in the next step's time."""
        self._report(always=last)
        try:
            yield
        finally:
            self._clock = time.perf_counter()

    def close(self) -> None:
        self._report(always=True)

    def _report(self, always: bool = False) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        m = jax.device_get(p.metrics)  # blocks until step p.step is done; the next one is already queued
        now = time.perf_counter()
        dt, self._clock = now - self._clock, now
        self.beat(p.step, dt)
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        # step_start_time: ml-goodput-measurement's key, the wall time at which this step began
        self.events.emit("step", step=p.step, duration_s=dt, data_wait_s=p.data_wait_s, loss=json_number(loss),
                         step_start_time=time.time() - dt)
        skipped = self.spikes.on_metrics(p.step, m)  # may raise: a rewind, or spikes the policy cannot absorb
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) and not skipped:
            raise NonFiniteLoss(f"loss {loss}, gradient norm {grad_norm} at step {p.step - 1}")
        self.last_loss = loss
        self.bar.update(1)
        if p.step % self.cfg.train.log_every and not always:
            return
        tps = self.tokens_per_step / dt
        mfu = self.flops_per_step / dt / self.peak_flops
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%", refresh=False)
        rec = {"step": p.step, "loss": loss, "grad_norm": grad_norm, "lr": float(m["lr"]),
               "tokens_per_s": tps, "mfu": mfu, "step_s": dt, "data_wait_s": p.data_wait_s,
               "epochs": self.epochs(p.step), "tokens": p.step * self.tokens_per_step}
        if skipped:
            rec["update_skipped"] = True  # a loss spike under spike.policy=skip_update
        self.metrics.write(json.dumps(rec) + "\n")


class Evaluator:
    """The held-out loss every `train.eval_every` steps and at the end (per source: token mean; overall:
    weighted by the initial mixture). The eval batches are placed on the devices once."""

    def __init__(self, run: Run, eval_sets: dict[str, list], weights: dict[str, float], events: EventLog,
                 metrics: TextIO, write: Callable[[str], None]):
        self.run, self.events, self.metrics, self.write = run, events, metrics, write
        self.sets = {name: [run.to_device(b) for b in batches] for name, batches in eval_sets.items()}
        self.weights = weights
        self.every = run.cfg.train.eval_every
        self.last: tuple[int, float, dict[str, float]] | None = None
        self.compiled = False  # the first evaluation compiles the eval step

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def recall(self, metrics_path: Path, step: int) -> None:
        """Take the held-out loss at `step` from metrics.jsonl if an earlier attempt recorded it (a resume at that
        step evaluates the same parameters: `at` then neither recomputes nor writes it a second time)."""
        if not metrics_path.exists():
            return
        for line in metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("step") == step and "heldout_loss" in rec:
                by = rec.get("heldout_loss_by_source") or {name: rec["heldout_loss"] for name in self.sets}
                self.last = (step, float(rec["heldout_loss"]), {k: float(v) for k, v in by.items()})

    def maybe(self, step: int, params: Any) -> None:
        if self.due(step):
            self.at(step, params)

    def at(self, step: int, params: Any) -> tuple[float, dict[str, float]]:
        """The held-out loss at `step` (evaluated once per step)."""
        if self.last is None or self.last[0] != step:
            overall, by_source = self._evaluate(params)
            self.last = (step, overall, by_source)
            rec: dict[str, Any] = {"step": step, "heldout_loss": overall}
            if len(by_source) > 1:
                rec["heldout_loss_by_source"] = by_source
            self.metrics.write(json.dumps(rec) + "\n")
            self.write(f"step {step}: held-out loss {overall:.4f}" + ("" if len(by_source) < 2 else
                       " (" + ", ".join(f"{k} {v:.4f}" for k, v in by_source.items()) + ")"))
        return self.last[1], self.last[2]

    def _evaluate(self, params: Any) -> tuple[float, dict[str, float]]:
        with self.events.span("eval") as ev:
            by_source = {}
            for name, batches in self.sets.items():
                total = count = 0.0
                for b in batches:
                    loss, n = self.run.eval_loss(params, b)
                    total, count = total + float(loss) * float(n), count + float(n)
                by_source[name] = total / count
            self.compiled = True
            overall = sum(self.weights[k] * v for k, v in by_source.items())
            ev["heldout_loss"] = overall
            if len(by_source) > 1:
                ev["heldout_loss_by_source"] = by_source
        return overall, by_source


class Stopper:
    """Why the loop should stop after a step: "signal" (SIGTERM/SIGINT: checkpoint and exit 143), "stop_at"
    (train.stop_at reached, a time slice), "done" (train.steps reached); None to go on.

    A context manager that owns the signal handlers; a signal only raises a flag (a SIGINT after it stops at once:
    KeyboardInterrupt; a repeated SIGTERM changes nothing). In the loop the flag means: save the next step and stop.
    Before the first step there is nothing new to save: `stop_if_signalled` raises `Preempted` at the next phase
    boundary (after data preparation, restore, compilation), where no computation is in flight."""

    def __init__(self, plan: StepPlan):
        self.plan = plan
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Stopper:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signum
        elif signum == signal.SIGINT:  # a person pressing Ctrl-C again: stop now
            raise KeyboardInterrupt
        # a repeated SIGTERM is the same preemption (a launcher signalling every process of the job, and the
        # supervisor forwarding it too): the checkpoint at the next step is still the way out

    def stop_if_signalled(self, during: str) -> None:
        if self.signal is not None:
            raise Preempted(f"signal {self.signal} during {during}: nothing new to save; stopping")

    def check(self, step: int) -> str | None:
        if step >= self.plan.stop:
            return "done" if step >= self.plan.steps else "stop_at"
        return "signal" if self.signal is not None else None
