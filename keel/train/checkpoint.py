"""Checkpoints with Orbax: asynchronous saves, keep-last-k, restore onto the run's shardings.

A checkpoint holds the training state (params, optimizer state, step) and a small JSON record with the run
and data fingerprints, so a resume that would silently change the run is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from keel.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: Path, keep: int, async_save: bool = True):
        self.directory = directory.resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Returns once the state is copied off the device; the write finishes in the background."""
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            earlier = [s for s in self.all_steps() if s < step]
            hint = (f"move {self.directory / str(step)} aside to resume from step {earlier[-1]}"
                    if earlier else "no earlier checkpoint exists; start a new run directory")
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: {e}); {hint}"
            ) from e
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
