"""The training loop: state = (params, optimizer state, step); resume from the latest checkpoint is exact.

Running `train` twice on the same run directory continues the same run: the saved config must agree (up to
the keys in `RESUMABLE_KEYS`), the data fingerprint must agree, and the data order is a function of the
step, so a resumed run computes bitwise what an uninterrupted run computes (on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm import tqdm

from keel.config import Config, ConfigError, dump_yaml, fingerprint, from_dict, resume_differences
from keel.data.loader import DataSource, Prefetcher
from keel.data.pack import Batch, expand
from keel.io import atomic_write
from keel.model import transformer
from keel.model.sampling import greedy_sample
from keel.optim.optimizers import build_optimizer, describe_partition
from keel.parallel.sharding import Sharder, make_mesh, shard_like
from keel.train.checkpoint import Checkpointer, CheckpointError
from keel.train.events import EventLog
from keel.train.mfu import peak_flops_per_device

State = dict[str, Any]


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
    stopped_early: bool

    @property
    def below_unigram(self) -> float:
        """How far the held-out loss is below the unigram entropy, as a fraction of it."""
        return 1.0 - self.heldout_loss / self.unigram_entropy

    def table(self) -> str:
        rows = [
            ("run", self.run_dir),
            ("steps", f"{self.start_step} -> {self.step} of {self.steps}"
                      + ("  (stopped early: train.stop_at or a signal)" if self.stopped_early else "")),
            ("final train loss", f"{self.train_loss:.4f} nats"),
            ("held-out loss", f"{self.heldout_loss:.4f} nats"),
            ("unigram entropy", f"{self.unigram_entropy:.4f} nats  (held-out loss is "
                                f"{100 * self.below_unigram:.1f}% below it)"),
            ("tokens seen", f"{self.tokens_seen:,}"),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines.append("sample (greedy):")
        lines.extend("  | " + line for line in self.sample.splitlines() or [""])
        return "\n".join(lines)


def _check_run_dir(cfg: Config, run_dir: Path, allow_config_change: bool) -> None:
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        saved = from_dict(yaml.safe_load(saved_path.read_text()))
        diffs = resume_differences(saved, cfg)
        if diffs and not allow_config_change:
            raise ConfigError(
                f"{run_dir} holds a run with a different configuration; resuming would change it:\n  "
                + "\n  ".join(diffs)
                + "\nuse a new run_dir, or pass --allow-config-change to resume anyway"
            )
    if jax.process_index() == 0:
        atomic_write(saved_path, dump_yaml(cfg))


def state_init_fn(cfg: Config, tx: optax.GradientTransformation) -> Callable[[jax.Array], State]:
    def init_state(key: jax.Array) -> State:
        params = transformer.init_params(cfg.model, key)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init_state


def _train_step_fn(cfg: Config, tx: optax.GradientTransformation, schedule, sharder: Sharder, bos: int, pad: int):
    def train_step(state: State, host_batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        batch = expand(host_batch["tokens"], host_batch["first_position"], bos, pad, jnp)

        def loss_of(params):
            return transformer.loss_fn(params, batch, cfg.model, sharder)

        (loss, n_targets), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                   "n_targets": n_targets}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


class _StopSignal:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the next step boundary (preemption)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True,
          allow_config_change: bool = False, devices: Sequence[jax.Device] | None = None) -> Summary:
    """Train (or resume) the run `cfg` describes. `devices`: the mesh's devices (default: all)."""
    t_start = time.monotonic()
    run_dir = Path(cfg.run_dir).resolve()
    _check_run_dir(cfg, run_dir, allow_config_change)
    host, n_hosts = jax.process_index(), jax.process_count()
    events = EventLog(run_dir / "events" / f"host{host:04d}.jsonl", host)
    events.emit("start", run_fingerprint=fingerprint(cfg), devices=jax.device_count(),
                backend=jax.default_backend())
    try:
        return _train(cfg, run_dir, events, host, n_hosts, t_start, log, progress, devices, allow_config_change)
    except BaseException as e:
        events.emit("failure", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        events.close()


def _train(cfg: Config, run_dir: Path, events: EventLog, host: int, n_hosts: int, t_start: float,
           log: Callable[[str], None], progress: bool, devices: Sequence[jax.Device] | None,
           allow_config_change: bool) -> Summary:
    with events.span("data_prepare"):
        data = DataSource(cfg, run_dir, log, progress=progress and host == 0, host=host)
    if host == 0 and not (run_dir / "tokenizer.json").exists():
        atomic_write(run_dir / "tokenizer.json", data.tokenizer.to_str(pretty=True))
    stop = cfg.train.stop_at or cfg.train.steps
    data.check_budget(stop)
    mesh = make_mesh(cfg.mesh, devices)
    sharder = Sharder(mesh)
    param_shardings = sharder.tree(transformer.abstract_params(cfg.model), transformer.logical_axes(cfg.model))
    tx, schedule = build_optimizer(cfg, param_shardings, mesh)
    if cfg.optim.name == "muon":
        log(f"optimizer partition (Muon strategy {cfg.optim.muon_strategy}):\n{describe_partition(cfg.model)}")

    init_state = state_init_fn(cfg, tx)
    key = jax.random.key(cfg.train.seed)
    abstract_state = jax.eval_shape(init_state, key)
    replicated = sharder.replicated()
    state_shardings = {
        "params": param_shardings,
        "opt_state": shard_like(abstract_state["opt_state"], param_shardings, replicated),
        "step": replicated,
    }
    n_params = transformer.count_params(cfg.model)
    log(f"model: {n_params:,} parameters; mesh {dict(mesh.shape)} on {jax.device_count()} "
        f"{jax.default_backend()} device(s); compute dtype {transformer.compute_dtype(cfg.model)}")

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
    meta = {"run_fingerprint": fingerprint(cfg), "data_fingerprint": data.fingerprint, "data": data.description,
            "skip_steps": data.skip.ranges}
    latest = ckpt.latest_step()
    if latest is None:
        with events.span("init"):
            state = jax.jit(init_state, out_shardings=state_shardings)(key)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, state_shardings)
        with events.span("checkpoint_restore", step=latest):
            state, saved_meta = ckpt.restore(latest, target)
        _check_data_resume(saved_meta, data, latest, run_dir, allow_config_change, log)
        log(f"resumed from checkpoint at step {latest}")

    batch_sharding = {"tokens": sharder.sharding(("batch", None), (cfg.train.batch_size, cfg.data.seq_len + 1)),
                      "first_position": sharder.sharding(("batch",), (cfg.train.batch_size,))}
    step_fn = jax.jit(
        _train_step_fn(cfg, tx, schedule, sharder, data.bos_id, data.pad_id),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    def eval_loss(params, host_batch: Batch):
        batch = expand(host_batch["tokens"], host_batch["first_position"], data.bos_id, data.pad_id, jnp)
        return transformer.loss_fn(params, batch, cfg.model, sharder)

    eval_fn = jax.jit(eval_loss, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)

    def to_device(batch: Batch) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(batch_sharding[k], v) for k, v in batch.items()}

    eval_sets = {name: [to_device(b) for b in batches]
                 for name, batches in data.eval_sets(cfg.train.eval_batches).items()}

    def heldout_loss(params) -> tuple[float, dict[str, float]]:
        """The held-out loss (per source: token mean; overall: weighted by the initial mixture) and per source."""
        with events.span("eval") as ev:
            by_source = {}
            for name, batches in eval_sets.items():
                total = count = 0.0
                for b in batches:
                    loss, n = eval_fn(params, b)
                    total, count = total + float(loss) * float(n), count + float(n)
                by_source[name] = total / count
            overall = sum(data.eval_weights[k] * v for k, v in by_source.items())
            ev["heldout_loss"] = overall
            if len(by_source) > 1:
                ev["heldout_loss_by_source"] = by_source
        return overall, by_source

    def eval_record(step: int, loss: float, by_source: dict[str, float]) -> str:
        rec = {"step": step, "heldout_loss": loss}
        if len(by_source) > 1:
            rec["heldout_loss_by_source"] = by_source
        return json.dumps(rec) + "\n"

    start = int(state["step"])
    steps = cfg.train.steps
    run_steps = [s for s in range(start, stop) if s not in data.skip]
    if len(run_steps) < stop - start:
        log(f"data: skipping {stop - start - len(run_steps)} step(s) in data.skip_steps={list(cfg.data.skip_steps)}")
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    peak, peak_source = peak_flops_per_device(jax.local_devices()[0])
    flops_per_step = transformer.model_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    log(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")

    # Host 0 writes the run's metrics; every host writes its own events.
    metrics_path = run_dir / "metrics.jsonl" if host == 0 else Path(os.devnull)
    metrics_file = open(metrics_path, "a", buffering=1)  # noqa: SIM115 - closed in the finally below
    train_loss = float("nan")
    last_eval = float("nan")
    stopped_early = False

    def save(step: int) -> None:
        with events.span("checkpoint_save", step=step):
            ckpt.save(step, state, meta)

    if run_steps:
        with events.span("compile") as ev:
            t0 = time.perf_counter()
            step_fn = step_fn.lower(state, to_device(data.host_batch(run_steps[0], host, n_hosts))).compile()
            ev["seconds"] = time.perf_counter() - t0
            ev["param_shardings"] = {jax.tree_util.keystr(p): str(s.spec) for p, s in
                                     jax.tree_util.tree_flatten_with_path(step_fn.output_shardings[0]["params"])[0]}
        log(f"compiled the train step in {ev['seconds']:.1f}s")
    prefetch = Prefetcher(data, run_steps, host, n_hosts, depth=cfg.data.prefetch)
    bar = tqdm(total=steps, initial=start, disable=not progress or host != 0, unit="step",
               dynamic_ncols=True, desc="train")
    try:
        def skip_to(step: int) -> None:
            """Steps in data.skip_steps get no update: the step counter moves past them."""
            events.emit("data_skip", start=done, stop=step)
            bar.update(step - done)
            state["step"] = jax.device_put(jnp.asarray(step, jnp.int32), replicated)

        with _StopSignal() as sig:
            t_prev = time.perf_counter()
            done = start  # the step the state is at, kept on the host (no device read per step)
            for step, host_batch in prefetch:
                wait = prefetch.last_wait_s
                if step != done:
                    skip_to(step)
                state, m = step_fn(state, to_device(host_batch))
                m = jax.device_get(m)  # one sync per step: the step time below is real compute time
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                train_loss = float(m["loss"])
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"loss is {train_loss} at step {step}; last checkpoint: "
                                             f"{ckpt.latest_step()}")
                done = step + 1
                events.emit("step", step=done, duration_s=dt, data_wait_s=wait, loss=train_loss)
                tps = tokens_per_step / dt
                mfu = flops_per_step / dt / (peak * jax.device_count())
                bar.update(1)
                if done % cfg.train.log_every == 0 or done == stop:
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%",
                                    refresh=False)
                    rec = {"step": done, "loss": train_loss, "grad_norm": float(m["grad_norm"]),
                           "lr": float(m["lr"]), "tokens_per_s": tps, "mfu": mfu, "step_s": dt,
                           "data_wait_s": wait, "epochs": data.epochs(done), "tokens": done * tokens_per_step}
                    metrics_file.write(json.dumps(rec) + "\n")
                if done % cfg.train.eval_every == 0 and done != steps:
                    last_eval, by_source = heldout_loss(state["params"])
                    metrics_file.write(eval_record(done, last_eval, by_source))
                    bar.write(f"step {done}: held-out loss {last_eval:.4f}" + ("" if len(by_source) < 2 else
                              " (" + ", ".join(f"{k} {v:.4f}" for k, v in by_source.items()) + ")"))
                if sig.received is not None and done < stop:
                    log(f"signal {sig.received}: checkpointing step {done} and stopping")
                    events.emit("preempted", step=done, signal=sig.received)
                    stopped_early = True
                    stop = done
                if done == stop or done % cfg.checkpoint.every == 0:
                    save(done)
                if done == stop:
                    break
            else:  # the last steps before `stop` were all in the skip list
                if done < stop:
                    skip_to(stop)
                    done = stop
                    save(stop)
    finally:
        bar.close()
        prefetch.close()
        with events.span("checkpoint_wait"):
            ckpt.close()
        metrics_file.close()

    end_step = int(state["step"])
    stopped_early = stopped_early or end_step < steps
    last_eval, by_source = heldout_loss(state["params"])
    with open(metrics_path, "a") as f:
        f.write(eval_record(end_step, last_eval, by_source))
    tok = data.tokenizer
    prompt = [data.bos_id] + tok.encode(cfg.train.sample_prompt, add_special_tokens=False).ids
    sample_ids = greedy_sample(state["params"], prompt, cfg.train.sample_tokens, cfg.model, data.eos_id,
                               out_sharding=replicated)
    sample = cfg.train.sample_prompt + tok.decode(sample_ids)
    summary = Summary(
        run_dir=str(run_dir), start_step=start, step=end_step, steps=steps,
        train_loss=train_loss if start < end_step else float("nan"), heldout_loss=last_eval,
        unigram_entropy=data.unigram_entropy(), tokens_seen=end_step * tokens_per_step,
        wall_s=time.monotonic() - t_start, sample=sample, stopped_early=stopped_early,
    )
    events.emit("end", step=end_step, heldout_loss=last_eval, stopped_early=stopped_early)
    if host == 0:
        atomic_write(run_dir / "summary.json",
                     json.dumps(summary.__dict__ | {"below_unigram": summary.below_unigram}, indent=1))
    return summary


def _check_data_resume(saved_meta: dict, data: DataSource, step: int, run_dir: Path, allow: bool,
                       log: Callable[[str], None]) -> None:
    """The data that produced the checkpoint must be the data that continues it (or the user says otherwise)."""
    from keel.config import flatten

    saved, now = flatten(saved_meta.get("data", {})), flatten(data.description)
    diffs = [f"data {k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if not saved_meta.get("data") and saved_meta.get("data_fingerprint") != data.fingerprint:
        diffs.append(f"data fingerprint {saved_meta.get('data_fingerprint')} -> {data.fingerprint}")
    applied = [list(r) for r in saved_meta.get("skip_steps", [])]
    applied = [[a, min(b, step - 1)] for a, b in applied if a < step]
    current = [list(r) for r in data.skip.before(step)]
    if applied != current:
        diffs.append(f"data.skip_steps before step {step}: {applied} -> {current} (steps already trained)")
    if not diffs:
        return
    message = (f"checkpoint {step} in {run_dir} was trained on other data; resuming would change what the model "
               f"saw:\n  " + "\n  ".join(diffs))
    if not allow:
        raise ConfigError(message + "\nuse a new run_dir, or pass --allow-config-change to resume anyway")
    log(message + "\n(--allow-config-change: continuing with the new data order)")


def load_params(run_dir: str | Path, cfg: Config, step: int | None = None) -> tuple[Any, int]:
    """The parameters of a run's checkpoint (latest by default), on the default device, as numpy arrays."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    abstract = jax.eval_shape(state_init_fn(cfg, build_optimizer(cfg)[0]), jax.random.key(0))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
    state, _ = ckpt.restore(step, target)
    ckpt.close()
    return jax.tree.map(np.asarray, state["params"]), step
