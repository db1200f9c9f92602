"""Loss spikes: a robust detector inside the train step, and what the host does about a spike (`spike.*`).

In the step (no host sync): the state carries a window of the last `spike.window` accepted losses and gradient
norms. A step is a spike when, with at least `spike.min_history` steps of history, its loss or gradient norm is
above the window's median by more than `threshold` robust standard deviations (1.4826 x MAD) and by more than a
minimum rise (`loss_min_rise`, `grad_norm_min_rise`, as fractions of the median: a steady loss has a tiny MAD, and
gradient norms are heavy-tailed), or when either is not finite. A spike does not enter the window (the baseline
stays the clean one; under `warn`, whose updates are applied, it does); `streak` counts spikes in a row. Under
`skip_update` the step's update is not applied (as MaxText does): the parameters and optimizer state stay those
before it, the step counter moves on. Median and MAD rather than OLMo's mean + 6 sigma: one spike in the window does
not inflate the threshold that should catch the next.

On the host (`SpikeWatch`, one step late like every metric): a `spike` event; under `skip_update`,
`max_consecutive` spikes in a row stop the run (LossSpikes, exit 8); under `rewind`, `Rewind` unwinds the attempt:
`rewind()` records the decision to skip the offending steps (keel/train/plan.py), sets aside the checkpoints
written after the spike, and the trainer starts a new attempt from the checkpoint before it. Everything the
detector decides is a function of the state and the data, so a replay decides the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from keel.config import SpikeConfig
from keel.errors import LossSpikes
from keel.train.events import EventLog, json_number
from keel.train.plan import record_decision

Monitor = dict[str, jax.Array]


def init_monitor(cfg: SpikeConfig) -> Monitor:
    """An empty window: no history, no streak."""
    empty = jnp.full((cfg.window,), jnp.nan, jnp.float32)
    return {"loss": empty, "grad_norm": empty, "count": jnp.zeros((), jnp.int32),
            "streak": jnp.zeros((), jnp.int32)}


def _outlier(history: jax.Array, x: jax.Array, threshold: float, min_rise: float) -> tuple[jax.Array, jax.Array]:
    """(x above the window's median by more than `threshold` robust sigmas and `min_rise` x |median|, the median)."""
    median = jnp.nanmedian(history)
    sigma = 1.4826 * jnp.nanmedian(jnp.abs(history - median))
    return x - median > jnp.maximum(threshold * sigma, min_rise * jnp.abs(median)), median


def detect(monitor: Monitor, loss: jax.Array, grad_norm: jax.Array, cfg: SpikeConfig
           ) -> tuple[jax.Array, Monitor, dict[str, jax.Array]]:
    """(is this step a spike, the updated monitor, metrics: the baselines and the streak). Traced in the step."""
    loss, grad_norm = loss.astype(jnp.float32), grad_norm.astype(jnp.float32)
    loss_high, loss_base = _outlier(monitor["loss"], loss, cfg.threshold, cfg.loss_min_rise)
    norm_high, norm_base = _outlier(monitor["grad_norm"], grad_norm, cfg.threshold, cfg.grad_norm_min_rise)
    judged = monitor["count"] >= cfg.min_history
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    spike = jnp.asarray(cfg.policy != "off") & (~finite | (judged & (loss_high | norm_high)))
    slot = monitor["count"] % cfg.window
    keep = ~spike | jnp.asarray(cfg.policy == "warn")  # under warn the update is applied: the baseline follows

    def push(window: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.where(keep, window.at[slot].set(x), window)

    new = {"loss": push(monitor["loss"], loss), "grad_norm": push(monitor["grad_norm"], grad_norm),
           "count": monitor["count"] + keep.astype(jnp.int32),
           "streak": jnp.where(spike, monitor["streak"] + 1, 0).astype(jnp.int32)}
    metrics = {"spike": spike, "loss_baseline": loss_base, "grad_norm_baseline": norm_base,
               "spike_streak": new["streak"]}
    return spike, new, metrics


def keep_if_spike(spike: jax.Array, before: Any, after: Any) -> Any:
    """`after`, or `before` where the step was a spike (skip_update: the update is not applied)."""
    return jax.tree.map(lambda b, a: jnp.where(spike, b, a), before, after)


class Rewind(Exception):  # noqa: N818  (control flow, not an error)
    """Unwind the attempt: the step `spike_step` (0-based) spiked under the `rewind` policy."""

    def __init__(self, spike_step: int, loss: float, grad_norm: float):
        super().__init__(f"loss spike at step {spike_step}: rewinding")
        self.spike_step, self.loss, self.grad_norm = spike_step, loss, grad_norm


class SpikeWatch:
    """The host's side of the detector: reads a step's spike metrics (one step late) and acts on the policy."""

    def __init__(self, cfg: SpikeConfig, events: EventLog, log: Callable[[str], None]):
        self.cfg, self.events, self.log = cfg, events, log
        self.count = 0

    def on_metrics(self, step: int, m: dict[str, Any]) -> bool:
        """`step`: the count after the step. True if the step spiked (its non-finite loss is then handled)."""
        if not bool(m.get("spike", False)):
            return False
        self.count += 1
        loss, norm = float(m["loss"]), float(m["grad_norm"])
        action = self.cfg.policy
        self.events.emit("spike", step=step, loss=json_number(loss), grad_norm=json_number(norm), action=action,
                         loss_baseline=json_number(float(m["loss_baseline"])),
                         grad_norm_baseline=json_number(float(m["grad_norm_baseline"])), streak=int(m["spike_streak"]))
        self.log(f"loss spike at step {step - 1}: loss {loss:.4g} (baseline {float(m['loss_baseline']):.4g}), "
                 f"gradient norm {norm:.4g} (baseline {float(m['grad_norm_baseline']):.4g})"
                 + {"warn": "", "skip_update": ": update not applied", "rewind": ": rewinding"}[action])
        if action == "rewind":
            raise Rewind(step - 1, loss, norm)
        if action == "skip_update" and int(m["spike_streak"]) >= self.cfg.max_consecutive:
            raise LossSpikes(f"{int(m['spike_streak'])} loss spikes in a row up to step {step - 1} "
                             f"(spike.max_consecutive={self.cfg.max_consecutive}): the baseline has moved or the "
                             f"data is bad over a range; resume with spike.policy=rewind or data.skip_steps")
        return action == "skip_update"


def rewind(run_dir: Path, spike: Rewind, cfg: SpikeConfig, checkpoints: list[int],
           set_aside: Callable[[int, str], Path], events: EventLog, act: bool = True) -> int:
    """Persist the decision (skip the offending steps), set aside the checkpoints that hold the spike's update,
    and return the step of the checkpoint the next attempt restores (0: none, start over). `act`: whether this
    process writes (process 0 of a multi-host run; the others only record the event)."""
    to_step = max((s for s in checkpoints if s <= spike.spike_step), default=0)
    first = max(to_step, spike.spike_step - cfg.rewind_skip + 1)
    steps = f"{first}-{spike.spike_step}"
    # every process takes part in setting aside (process 0 moves); the checkpoints go first, so that a crash in
    # between leaves a run that resumes before the spike without a decision, never a decision before a checkpoint
    moved = [str(set_aside(s, "spike")) for s in checkpoints if s > spike.spike_step]
    if act:
        record_decision(run_dir, steps, "spike", spike_step=spike.spike_step, loss=json_number(spike.loss),
                        grad_norm=json_number(spike.grad_norm), rewound_to=to_step)
    events.emit("rewind", spike_step=spike.spike_step, to_step=to_step, skip=steps, set_aside=moved)
    return to_step
