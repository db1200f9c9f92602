"""`train(cfg)`: prepare the data, build the run, restore or initialise the state, loop, finish.

    run   = build_run(cfg, ...)                        # mesh, shardings, optimizer, jitted step and eval
    state = restore_or_init(run, ckpt, meta, plan ...) # every resume check lives in keel/train/resume.py
    for step, batch in prefetched(plan.train_steps(start)):
        state, metrics = run.step(state, batch)        # asynchronous: no device -> host read here
        logger.on_step(...)                            # reads the previous step's metrics
        evaluator / checkpointer when due; stopper.check(step) says when and why to stop
    finish(...)                                        # no eval or sample after a signal

Each observer decides its own cadence (keel/train/observe.py). Resuming a run directory continues the same run,
bitwise on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
from tqdm import tqdm

from keel.config import Config, fingerprint
from keel.data.inspect import unigram_entropy
from keel.data.loader import DataSource, Prefetcher
from keel.data.prepare import prepare_data
from keel.errors import EXIT_OK, EXIT_PREEMPTED
from keel.io import atomic_write
from keel.model import transformer
from keel.model.sampling import greedy_sample
from keel.train.checkpoint import Checkpointer
from keel.train.events import EventLog
from keel.train.mfu import peak_flops_per_device
from keel.train.observe import Evaluator, StepLogger, Stopper, metrics_writer
from keel.train.plan import StepPlan
from keel.train.resume import check_run_dir, checkpoint_meta, restore_or_init
from keel.train.run import Run, build_run
from keel.train.state import TrainState

STOP_REASONS = {"done": "", "stop_at": "train.stop_at", "signal": "a signal: no final evaluation or sample"}


@dataclass
class Summary:
    run_dir: str
    start_step: int
    step: int
    steps: int
    train_loss: float
    heldout_loss: float
    unigram_entropy: float
    tokens_seen: int
    wall_s: float
    sample: str
    reason: str  # why the process stopped: "done", "stop_at" or "signal" (see Stopper)

    @property
    def stopped_early(self) -> bool:
        return self.reason != "done"

    @property
    def exit_code(self) -> int:
        """143 after a signal (the launcher restarts the job, which resumes), else 0."""
        return EXIT_PREEMPTED if self.reason == "signal" else EXIT_OK

    @property
    def below_unigram(self) -> float:
        """How far the held-out loss is below the unigram entropy, as a fraction of it."""
        return 1.0 - self.heldout_loss / self.unigram_entropy

    def record(self) -> dict:
        return self.__dict__ | {"stopped_early": self.stopped_early, "below_unigram": self.below_unigram}

    def table(self) -> str:
        rows = [
            ("run", self.run_dir),
            ("steps", f"{self.start_step} -> {self.step} of {self.steps}"
                      + (f"  (stopped early: {STOP_REASONS[self.reason]})" if self.stopped_early else "")),
            ("final train loss", f"{self.train_loss:.4f} nats"),
            ("held-out loss", f"{self.heldout_loss:.4f} nats"),
            ("unigram entropy", f"{self.unigram_entropy:.4f} nats  (held-out loss is "
                                f"{100 * self.below_unigram:.1f}% below it)"),
            ("tokens seen", f"{self.tokens_seen:,}"),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.reason != "signal":
            lines.append("sample (greedy):")
            lines.extend("  | " + line for line in self.sample.splitlines() or [""])
        return "\n".join(lines)


def train(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True,
          allow_config_change: bool = False, devices: Sequence[jax.Device] | None = None) -> Summary:
    """Train (or resume) the run `cfg` describes. `devices`: the mesh's devices (default: all)."""
    t_start = time.monotonic()
    run_dir = Path(cfg.run_dir).resolve()
    check_run_dir(cfg, run_dir, allow_config_change)
    host = jax.process_index()
    events = EventLog(run_dir / "events" / f"host{host:04d}.jsonl", host)
    events.emit("start", run_fingerprint=fingerprint(cfg), devices=jax.device_count(),
                backend=jax.default_backend())
    try:
        with Stopper(cfg.train.steps, cfg.train.stop_at or cfg.train.steps) as stopper:
            return _train(cfg, run_dir, events, stopper, log, progress and host == 0, allow_config_change,
                          devices, t_start)
    except BaseException as e:
        events.emit("failure", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        events.close()


def _train(cfg: Config, run_dir: Path, events: EventLog, stopper: Stopper, log: Callable[[str], None],
           progress: bool, allow_config_change: bool, devices: Sequence[jax.Device] | None,
           t_start: float) -> Summary:
    host = jax.process_index()
    with events.span("data_prepare"):
        data = prepare_data(cfg, run_dir, log=log, progress=progress, host=host)
    if host == 0 and not (run_dir / "tokenizer.json").exists():
        atomic_write(run_dir / "tokenizer.json", data.tokenizer.to_str(pretty=True))
    plan = StepPlan.from_config(cfg)
    data.check_budget(plan.stop)
    run = build_run(cfg, data.bos_id, data.pad_id, devices, log)
    log(f"model: {transformer.count_params(cfg.model):,} parameters; mesh {dict(run.mesh.shape)} on "
        f"{jax.device_count()} {jax.default_backend()} device(s); compute dtype "
        f"{transformer.compute_dtype(cfg.model)}")
    for note in run.notes:
        log(f"sharding: {note}")
    meta = checkpoint_meta(fingerprint(cfg), data.fingerprint, data.description, plan)
    with contextlib.ExitStack() as stack:
        ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save,
                            cfg.checkpoint.every, events)
        stack.callback(ckpt.close)  # runs last: whatever happens, the last save is written
        state = restore_or_init(run, ckpt, meta, plan, events, allow_config_change, log)
        start = int(state.step)
        metrics = stack.enter_context(metrics_writer(run_dir, host))
        bar = stack.enter_context(tqdm(total=cfg.train.steps, initial=start, disable=not progress, unit="step",
                                       dynamic_ncols=True, desc="train"))
        evaluator = Evaluator(run, data.eval_sets(cfg.train.eval_batches), data.eval_weights, events, metrics,
                              bar.write if host == 0 else lambda line: None)  # host 0 speaks for the run
        logger = _step_logger(cfg, run, data, events, metrics, bar, log)
        state, reason = _loop(run, state, plan, data, ckpt, meta, logger, evaluator, stopper, events, log)
        return finish(cfg, data, state, reason, evaluator, logger, start, events, run_dir, t_start)


def _step_logger(cfg: Config, run: Run, data: DataSource, events: EventLog, metrics, bar: tqdm,
                 log: Callable[[str], None]) -> StepLogger:
    peak, peak_source = peak_flops_per_device(jax.local_devices()[0])
    log(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops = transformer.model_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    return StepLogger(cfg, events, metrics, bar, flops, peak * jax.device_count(), data.epochs)


def _loop(run: Run, state: TrainState, plan: StepPlan, data: DataSource, ckpt: Checkpointer, meta: dict,
          logger: StepLogger, evaluator: Evaluator, stopper: Stopper, events: EventLog,
          log: Callable[[str], None]) -> tuple[TrainState, str]:
    """Train the plan's steps from the state's step; returns the final state and why the loop stopped."""
    host, n_hosts = jax.process_index(), jax.process_count()
    done = int(state.step)  # the step the state is at, tracked on the host
    steps = plan.train_steps(done)
    if steps:
        with logger.paused():
            seconds = run.compile(state, data.host_batch(steps[0], host, n_hosts), events)
        log(f"compiled the train step in {seconds:.1f}s")
    prefetch = Prefetcher(data, steps, host, n_hosts, depth=run.cfg.data.prefetch)
    reason = None
    try:
        for step, batch in prefetch:
            if step != done:
                logger.on_skip(done, step)
                state = run.set_step(state, step)
            state, metrics = run.step(state, batch)
            done = step + 1
            logger.on_step(done, metrics, prefetch.last_wait_s)
            reason = stopper.check(done)
            if reason or evaluator.due(done) or ckpt.due(done):
                with logger.paused(last=reason is not None):
                    if reason != "signal":
                        evaluator.maybe(done, state.params)
                    ckpt.maybe_save(done, state, meta, force=reason is not None)
            if reason:
                break
    finally:
        prefetch.close()
        logger.close()
    if reason is None and done < plan.stop:  # the plan's last steps are all in the skip list
        logger.on_skip(done, plan.stop)
        state, done = run.set_step(state, plan.stop), plan.stop
        ckpt.save(done, state, meta)
    reason = reason or stopper.check(done) or "done"
    if reason == "signal":
        log(f"signal {stopper.signal}: checkpointed step {done}; stopping")
        events.emit("preempted", step=done, signal=stopper.signal)
    return state, reason


def finish(cfg: Config, data: DataSource, state: TrainState, reason: str, evaluator: Evaluator,
           logger: StepLogger, start: int, events: EventLog, run_dir: Path, t_start: float) -> Summary:
    """The run's summary (summary.json, the `end` event). After a signal: no evaluation, no sample."""
    end = int(state.step)
    heldout, sample = float("nan"), ""
    if reason != "signal":
        heldout = evaluator.at(end, state.params)[0]
        tok = data.tokenizer
        prompt = [data.bos_id] + tok.encode(cfg.train.sample_prompt, add_special_tokens=False).ids
        ids = greedy_sample(state.params, prompt, cfg.train.sample_tokens, cfg.model, data.eos_id,
                            out_sharding=evaluator.run.replicated)
        sample = cfg.train.sample_prompt + tok.decode(ids)
    summary = Summary(
        run_dir=str(run_dir), start_step=start, step=end, steps=cfg.train.steps,
        train_loss=logger.last_loss if start < end else math.nan, heldout_loss=heldout,
        unigram_entropy=unigram_entropy(data), tokens_seen=end * cfg.train.batch_size * cfg.data.seq_len,
        wall_s=time.monotonic() - t_start, sample=sample, reason=reason,
    )
    events.emit("end", step=end, heldout_loss=heldout, stopped_early=summary.stopped_early, reason=reason)
    if jax.process_index() == 0:
        atomic_write(run_dir / "summary.json", json.dumps(summary.record(), indent=1))
    return summary
