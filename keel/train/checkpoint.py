"""Checkpoints with Orbax: asynchronous saves, keep-last-k, restore onto the run's shardings.

A checkpoint holds the training state (params, optimizer state, step) and a small JSON record with the run
and data fingerprints, so a resume that would silently change the run is refused (keel/train/resume.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from keel.config import Config
from keel.errors import CheckpointError
from keel.train.events import EventLog
from keel.train.state import TrainState, abstract_state


class Checkpointer:
    """`every`: the cadence of `maybe_save`; `events`: where save spans go (None: nowhere)."""

    def __init__(self, directory: Path, keep: int, async_save: bool = True, every: int = 0,
                 events: EventLog | None = None):
        self.directory = directory.resolve()
        self.every = every
        self.events = events
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def maybe_save(self, step: int, state: TrainState, meta: dict[str, Any], force: bool = False) -> None:
        if force or self.due(step):
            self.save(step, state, meta)

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Returns once the state is copied off the device; the write finishes in the background."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state.as_dict()), meta=ocp.args.JsonSave(meta))
        with self._span("checkpoint_save", step=step):
            self.manager.save(step, args=args)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state at `step` restored onto `target`'s shapes, dtypes and shardings, and the saved record."""
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target.as_dict()), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            earlier = [s for s in self.all_steps() if s < step]
            hint = (f"move {self.directory / str(step)} aside to resume from step {earlier[-1]}"
                    if earlier else "no earlier checkpoint exists; start a new run directory")
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: {e}); {hint}"
            ) from e
        return TrainState.from_dict(out["state"]), dict(out["meta"])

    def wait(self) -> None:
        """Block until the last save is written (the `checkpoint_wait` event)."""
        with self._span("checkpoint_wait"):
            self.manager.wait_until_finished()

    def _span(self, kind: str, **fields: Any) -> contextlib.AbstractContextManager:
        return self.events.span(kind, **fields) if self.events is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Wait for any save in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(run_dir: str | Path, cfg: Config, step: int | None = None) -> tuple[Any, int]:
    """The parameters of a run's checkpoint (latest by default), on the default device, as numpy arrays."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{run_dir} has no checkpoint")
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_state(cfg))
        state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state.params), step
