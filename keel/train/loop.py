"""`train(cfg)`: prepare the data, build the run, restore or initialise the state, loop, finish.

    trainer = Trainer.build(cfg, ...)                  # data, plan, run (mesh, jitted step), checkpointer
    state   = restore_or_init(run, ckpt, meta, plan..) # every resume check lives in keel/train/resume.py
    trainer.loop(state):
        for step, batch in prefetched(plan.train_steps(start)):
            state, metrics = run.step(state, batch)    # asynchronous: no device -> host read here
            logger.on_step(...)                        # reads the previous step's metrics
            evaluator / checkpointer when due; stopper.check(step) says when and why to stop
    trainer.finish(state, reason)                      # no eval or sample after a signal

Each observer decides its own cadence (keel/train/observe.py). Resuming a run directory continues the same run,
bitwise on CPU. A loss spike under `spike.policy=rewind` ends the attempt (keel/train/spikes.py) and `train`
starts the next one in the same process, from the checkpoint before the spike. Restarts after a crash or a hang
are the supervisor's (keel/train/supervise.py); the hang watchdog (keel/train/watchdog.py) watches the loop.
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
from keel.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    CheckpointError,
    ConfigError,
    DataError,
    LossSpikes,
    NonFiniteLoss,
    Preempted,
    SilentDataCorruption,
)
from keel.evaluate.bpb import heldout_bits_per_byte
from keel.io import atomic_write, exclusive
from keel.model import transformer
from keel.model.sampling import READABLE, readable_sample
from keel.train.checkpoint import Checkpointer
from keel.train.events import EventLog
from keel.train.faults import Faults
from keel.train.fit import check_fit
from keel.train.mfu import peak_flops_per_device
from keel.train.observe import Evaluator, StepLogger, Stopper, metrics_writer
from keel.train.plan import StepPlan, read_decisions
from keel.train.resume import check_run_dir, checkpoint_meta, restore_or_init
from keel.train.run import Run, build_run
from keel.train.sdc import SDCCheck
from keel.train.spikes import Rewind, SpikeWatch, rewind
from keel.train.state import TrainState
from keel.train.watchdog import Watchdog

STOP_REASONS = {"done": "", "stop_at": "train.stop_at", "signal": "a signal: no final evaluation or sample"}


@dataclass
class Summary:
    run_dir: str
    start_step: int
    step: int
    steps: int
    train_loss: float
    heldout_loss: float
    heldout_bits_per_byte: float  # tokenizer-independent: runs with different tokenizers compare
    unigram_entropy: float
    tokens_seen: int
    wall_s: float
    sample: str | None  # None: not sampled (a signal came)
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
        """summary.json: strict JSON (a loss that was not measured is null, not NaN)."""
        rec = self.__dict__ | {"stopped_early": self.stopped_early, "below_unigram": self.below_unigram}
        return {k: _finite_or_none(v) for k, v in rec.items()}

    def table(self) -> str:
        rows = [
            ("run", self.run_dir),
            ("steps", f"{self.start_step} -> {self.step} of {self.steps}"
                      + (f"  (stopped early: {STOP_REASONS[self.reason]})" if self.stopped_early else "")),
            ("final train loss", f"{self.train_loss:.4f} nats"),
            ("held-out loss", f"{self.heldout_loss:.4f} nats" if math.isfinite(self.heldout_loss)
                              else "not measured (a signal came: no final evaluation)"),
            ("held-out bits/byte", f"{self.heldout_bits_per_byte:.4f}" if math.isfinite(self.heldout_bits_per_byte)
                                   else "not measured"),
            ("unigram entropy", f"{self.unigram_entropy:.4f} nats" + (
                f"  (held-out loss is {100 * self.below_unigram:.1f}% below it)"
                if math.isfinite(self.heldout_loss) else "")),
            ("tokens seen", f"{self.tokens_seen:,}"),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.sample is not None:
            lines.append(f"sample (temperature {READABLE.temperature:g}, top-p {READABLE.top_p:g}):")
            lines.extend("  | " + line for line in self.sample.splitlines() or [""])
        return "\n".join(lines)


def train(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True,
          allow_config_change: bool = False, devices: Sequence[jax.Device] | None = None,
          restart_from_scratch: bool = False) -> Summary:
    """Train (or resume) the run `cfg` describes. `devices`: the mesh's devices (default: all). One process per
    host may train a run directory at a time: a second one is refused before it writes anything."""
    t_start = time.monotonic()
    run_dir = Path(cfg.run_dir).resolve()
    host = jax.process_index()
    with exclusive(run_dir / f".lock-host{host:04d}", f"run directory {run_dir} (host {host})"):
        use_compile_cache(cfg, run_dir, log)
        rewinds = 0
        while True:
            try:
                return _attempt(cfg, run_dir, t_start, log=log, progress=progress,
                                allow_config_change=allow_config_change, devices=devices,
                                restart_from_scratch=restart_from_scratch)
            except Rewind as r:
                rewinds += 1
                if rewinds > cfg.spike.max_rewinds:
                    raise LossSpikes(f"loss spike at step {r.spike_step} after {cfg.spike.max_rewinds} rewinds "
                                     f"(spike.max_rewinds); the skip decisions are in {run_dir}/skip_decisions"
                                     f".jsonl and a resume continues from them") from None


def use_compile_cache(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> None:
    """Turn on JAX's persistent compilation cache (`train.compile_cache`) so that a restart loads the compiled
    step instead of compiling it again; a cache this process already has configured is left as it is."""
    where = cfg.train.compile_cache
    if where == "off" or (not where and jax.config.jax_compilation_cache_dir):
        return
    path = Path(where) if where else run_dir / "compile_cache"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _attempt(cfg: Config, run_dir: Path, t_start: float, *, log: Callable[[str], None], progress: bool,
             allow_config_change: bool, devices: Sequence[jax.Device] | None, restart_from_scratch: bool
             ) -> Summary:
    """One process's attempt at the run: events, then build, restore, loop and finish."""
    check_run_dir(cfg, run_dir, allow_config_change)
    host = jax.process_index()
    events = EventLog(run_dir / "events" / f"host{host:04d}.jsonl", host)
    plan = StepPlan.from_config(cfg)
    stopper = Stopper(plan)
    try:
        with stopper, contextlib.ExitStack() as stack:
            _emit_start(events, cfg)
            trainer = Trainer.build(cfg, run_dir, plan, events, stopper, stack, log=log,
                                    progress=progress and host == 0, devices=devices)
            stopper.stop_if_signalled("data preparation")
            state = restore_or_init(trainer.run, trainer.ckpt, trainer.meta, plan, events, allow_config_change, log,
                                    restart_from_scratch)
            start = int(state.step)
            stopper.stop_if_signalled("restore" if start else "initialisation")
            trainer.observe(start, stack)
            try:
                state, reason = trainer.loop(state, start)
            except Rewind as r:
                trainer.rewind(r)
                raise
            return trainer.finish(state, reason, start, t_start)
    except Rewind:
        raise  # not a failure: `train` starts the next attempt
    except Preempted as e:
        events.emit("preempted", signal=stopper.signal, note=str(e))
        raise
    except BaseException as e:
        events.emit("failure", reason=failure_reason(e), error=f"{type(e).__name__}: {e}")
        raise
    finally:
        events.close()


def _emit_start(events: EventLog, cfg: Config) -> None:
    """`start` (with ml-goodput-measurement's `job_start_time`), and for a process that is not the host's first,
    `restart`: the previous attempt, how it ended, and the gap since its last event."""
    now = time.time()
    events.emit("start", run_fingerprint=fingerprint(cfg), devices=jax.device_count(),
                backend=jax.default_backend(), job_start_time=now)
    if events.previous is not None:
        events.emit("restart", previous_attempt=events.attempt - 1, previous_ending=events.previous_ending(),
                    previous_last_event=events.previous.get("kind"),
                    gap_s=max(0.0, now - float(events.previous.get("t_wall", now))))


FAILURE_REASONS: dict[type[BaseException], str] = {
    FloatingPointError: "non_finite_loss", DataError: "data_error", ConfigError: "config_error",
    CheckpointError: "checkpoint_error", KeyboardInterrupt: "signal", SilentDataCorruption: "sdc",
    LossSpikes: "spike",
}


def failure_reason(e: BaseException) -> str:
    """The class of a failure for accounting and for a supervisor's restart decision; "crash" for the rest."""
    return next((r for t, r in FAILURE_REASONS.items() if isinstance(e, t)), "crash")


@dataclass
class Trainer:
    """The collaborators of one process's run; `observe` adds the observers once the start step is known."""

    cfg: Config
    run_dir: Path
    data: DataSource
    plan: StepPlan
    run: Run
    ckpt: Checkpointer
    meta: dict
    events: EventLog
    stopper: Stopper
    faults: Faults
    sdc: SDCCheck
    log: Callable[[str], None]
    progress: bool
    logger: StepLogger | None = None
    evaluator: Evaluator | None = None

    @classmethod
    def build(cls, cfg: Config, run_dir: Path, plan: StepPlan, events: EventLog, stopper: Stopper,
              stack: contextlib.ExitStack, *, log: Callable[[str], None], progress: bool,
              devices: Sequence[jax.Device] | None) -> Trainer:
        """Data, run and checkpointer (closed by `stack`, last: whatever happens, the last save is written)."""
        host = jax.process_index()
        check_fit(cfg, devices, log)  # before anything is read or allocated
        with events.span("data_prepare"):
            data = prepare_data(cfg, run_dir, log=log, progress=progress, host=host)
        if host == 0 and not (run_dir / "tokenizer.json").exists():
            atomic_write(run_dir / "tokenizer.json", data.tokenizer.to_str(pretty=True))
        data.check_budget(plan.stop)
        run = build_run(cfg, data.bos_id, data.pad_id, devices, log)
        log(f"model: {transformer.count_params(cfg.model):,} parameters; mesh {dict(run.mesh.shape)} on "
            f"{jax.device_count()} {jax.default_backend()} device(s); compute dtype "
            f"{transformer.compute_dtype(cfg.model)}")
        for note in run.notes:
            log(f"sharding: {note}")
        meta = checkpoint_meta(fingerprint(cfg), data.fingerprint, data.description, plan)
        ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save,
                            cfg.checkpoint.every, events)
        stack.callback(ckpt.close)
        faults = Faults.from_env(run_dir)
        sdc = SDCCheck(run, cfg.train.sdc_every, events, faults)
        return cls(cfg, run_dir, data, plan, run, ckpt, meta, events, stopper, faults, sdc, log, progress)

    def observe(self, start: int, stack: contextlib.ExitStack) -> None:
        """metrics.jsonl, the progress bar, the step logger and the evaluator, from step `start` on."""
        cfg, host = self.cfg, jax.process_index()
        metrics = stack.enter_context(metrics_writer(self.run_dir, host, start))
        bar = stack.enter_context(tqdm(total=cfg.train.steps, initial=start, disable=not self.progress,
                                       unit="step", dynamic_ncols=True, desc="train"))
        self.evaluator = Evaluator(self.run, self.data.eval_sets(cfg.train.eval_batches), self.data.eval_weights,
                                   self.events, metrics, bar.write if host == 0 else lambda line: None)
        self.evaluator.recall(self.run_dir / "metrics.jsonl", start)
        peak, peak_source = peak_flops_per_device(jax.local_devices()[0])
        self.log(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
        flops = transformer.model_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.batch_size \
            * cfg.data.seq_len
        self.logger = StepLogger(cfg, self.events, metrics, bar, flops, peak * jax.device_count(), self.data.epochs,
                                 SpikeWatch(cfg.spike, self.events, bar.write if host == 0 else lambda line: None))

    def loop(self, state: TrainState, start: int) -> tuple[TrainState, str]:
        """Train the plan's steps from `start` (the state's step); returns the final state and why it stopped."""
        cfg = self.cfg
        with Watchdog(self.events, self.run_dir, cfg.train.hang_factor, cfg.train.hang_floor_s) as dog:
            self.logger.beat = dog.beat
            return self._loop(state, start, dog)

    def _loop(self, state: TrainState, start: int, dog: Watchdog) -> tuple[TrainState, str]:
        run, logger, evaluator, ckpt = self.run, self.logger, self.evaluator, self.ckpt
        host, n_hosts = jax.process_index(), jax.process_count()
        done = start  # the step the state is at, tracked on the host
        steps = self.plan.train_steps(done)
        if steps:
            with logger.paused(), dog.suspend():
                seconds = run.compile(state, self.data.host_batch(steps[0], host, n_hosts), self.events)
            self.log(f"compiled the train step in {seconds:.1f}s")
        if len(steps) < self.plan.stop - done:
            ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.plan.skip.ranges)
            self.log(f"data: skipping {self.plan.stop - done - len(steps)} step(s) of the skip list [{ranges}] "
                     f"(data.skip_steps and the run's decisions in {self.run_dir}/skip_decisions.jsonl)")
        self.stopper.stop_if_signalled("compilation")
        prefetch = Prefetcher(self.data, steps, host, n_hosts, depth=self.cfg.data.prefetch)
        reason = None
        try:
            for step, batch in prefetch:
                if step != done:
                    logger.on_skip(done, step)
                    state = run.set_step(state, step)
                if self.faults.planned:
                    batch = self.faults.before_step(step, batch, self.cfg.model.vocab_size)
                if self.sdc.due(step):
                    with logger.paused(), _first(dog, not self.sdc.warm):  # the first check compiles its probes
                        self.sdc.check(step, state.params, batch)
                    dog.touch()
                state, metrics = run.step(state, batch)
                done = step + 1
                logger.on_step(done, metrics, prefetch.last_wait_s)
                reason = self.stopper.check(done)
                if reason or evaluator.due(done) or ckpt.due(done):
                    first_eval = evaluator.due(done) and not evaluator.compiled  # compiles the eval step
                    with logger.paused(last=reason is not None), _first(dog, first_eval):
                        ckpt.maybe_save(done, state, self.meta, force=reason is not None)
                        if reason != "signal":
                            evaluator.maybe(done, state.params)  # while the checkpoint is written
                    dog.touch()
                if reason:
                    break
        except NonFiniteLoss as e:
            prefetch.close()
            raise NonFiniteLoss(f"{e}; last checkpoint: {ckpt.latest_step()}") from None
        except BaseException:
            prefetch.close()
            with contextlib.suppress(Exception):  # the pending step's record if it can be read: the error wins
                logger.close()
            raise
        prefetch.close()
        logger.close()
        with dog.suspend():  # the final save's background part (and its manifest) may take long on a big state
            return self._end(state, done, reason)

    def rewind(self, spike: Rewind) -> None:
        """After a spike under `spike.policy=rewind`: record the decision and set aside the checkpoints that hold
        the spike's update (process 0; the others wait for it), so the next attempt restores the one before."""
        self.ckpt.wait()
        to_step = rewind(self.run_dir, spike, self.cfg.spike, self.ckpt.all_steps(), self.ckpt.set_aside,
                         self.events, act=jax.process_index() == 0)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("keel rewind")
        self.log(f"rewinding to step {to_step}; steps {read_decisions(self.run_dir)[-1]['steps']} will be skipped")

    def _end(self, state: TrainState, done: int, reason: str | None) -> tuple[TrainState, str]:
        """The final checkpoint is written before anything else happens (summary, sample)."""
        if reason is None and done < self.plan.stop:  # the plan's last steps are all in the skip list
            self.logger.on_skip(done, self.plan.stop)
            state, done = self.run.set_step(state, self.plan.stop), self.plan.stop
            self.ckpt.save(done, state, self.meta)
        self.ckpt.wait()
        reason = reason or self.stopper.check(done) or "done"
        if reason == "signal":
            self.log(f"signal {self.stopper.signal}: checkpointed step {done}; stopping")
            self.events.emit("preempted", step=done, signal=self.stopper.signal)
        return state, reason

    def finish(self, state: TrainState, reason: str, start: int, t_start: float) -> Summary:
        """The run's summary (summary.json, the `end` event). After a signal (even one that came with the last
        step): no evaluation, no sample."""
        cfg, data = self.cfg, self.data
        end = int(state.step)
        heldout, bpb, sample = float("nan"), float("nan"), None
        if self.stopper.signal is None:
            heldout, by_source = self.evaluator.at(end, state.params)
            bpb = heldout_bits_per_byte(data, by_source, cfg.train.eval_batches)[0]
        if self.stopper.signal is None and cfg.train.sample_tokens > 0:
            prompt = [data.bos_id] + data.tokenizer.encode(cfg.train.sample_prompt, add_special_tokens=False).ids
            ids = readable_sample(state.params, prompt, cfg.train.sample_tokens, cfg.model, data.eos_id,
                                  out_sharding=self.run.replicated)
            sample = cfg.train.sample_prompt + data.tokenizer.decode(ids)
        summary = Summary(
            run_dir=str(self.run_dir), start_step=start, step=end, steps=cfg.train.steps,
            train_loss=self.logger.last_loss if start < end else math.nan, heldout_loss=heldout,
            heldout_bits_per_byte=bpb, unigram_entropy=unigram_entropy(data),
            tokens_seen=end * cfg.train.batch_size * cfg.data.seq_len,
            wall_s=time.monotonic() - t_start, sample=sample, reason=reason,
        )
        self.events.emit("end", step=end, heldout_loss=_finite_or_none(heldout), stopped_early=summary.stopped_early,
                         reason=reason)
        if jax.process_index() == 0:
            atomic_write(self.run_dir / "summary.json", json.dumps(summary.record(), indent=1))
        return summary


def _finite_or_none(x: object) -> object:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _first(dog: Watchdog, first: bool) -> contextlib.AbstractContextManager:
    """Suspend the watchdog around work done for the first time (it compiles); time it otherwise."""
    return dog.suspend() if first else contextlib.nullcontext()
