"""Fault injection into a real training process, for the recovery tests and `benchmarks/faults.py`.

`KEEL_INJECT="hang@40,spike@60,sdc@80"` (comma-separated kind@step, step 0-based as in `data.skip_steps`):

- `hang@N`: the loop stops before step N as if a collective never returned (the hang watchdog must act);
- `spike@N`: step N trains on a batch of nothing but the vocabulary's last (rarest) token (bad data: a loss
  spike). Bad data is in the data: every process that trains step N meets it again, until a skip decision
  (`spike.policy=rewind`) leaves the step out;
- `sdc@N`: the silent-data-corruption check at step N sees one flipped bit in a parameter on the permuted mesh
  (a device that computes wrong: `train.sdc_every` must divide N).

A hang or an SDC fault is transient: it fires once per run directory (recorded in `run_dir/injected_faults.jsonl`
before it acts), so the restarted process does not meet it again. A spike is recorded each time it fires. Without
the variable nothing here changes anything.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("hang", "spike", "sdc")
PERSISTENT = ("spike",)  # faults of the data, not of the machine: a replay of the step meets them again


class Faults:
    def __init__(self, spec: str, run_dir: Path):
        self.run_dir = run_dir
        self.planned: set[tuple[str, int]] = set()
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, _, step = item.partition("@")
            if kind not in KINDS or not step.isdigit():
                raise ValueError(f"KEEL_INJECT item {item!r}: expected kind@step with kind in {KINDS}")
            self.planned.add((kind, int(step)))
        done = run_dir / "injected_faults.jsonl"
        if done.exists():
            for line in done.read_text().splitlines():
                rec = json.loads(line)
                if rec["kind"] not in PERSISTENT:
                    self.planned.discard((rec["kind"], rec["step"]))

    @classmethod
    def from_env(cls, run_dir: Path) -> Faults:
        return cls(os.environ.get("KEEL_INJECT", ""), run_dir)

    def fire(self, kind: str, step: int) -> bool:
        """Whether fault `kind` is due at `step` (recorded as fired before it acts)."""
        if (kind, step) not in self.planned:
            return False
        if kind not in PERSISTENT:
            self.planned.remove((kind, step))
        with open(self.run_dir / "injected_faults.jsonl", "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "t_wall": time.time(), "pid": os.getpid()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def before_step(self, step: int, batch: dict[str, np.ndarray], vocab_size: int) -> dict[str, Any]:
        """Hang, or spoil the batch, if due at `step`; else the batch unchanged."""
        if self.fire("hang", step):
            while True:  # as stuck as a collective that never returns (only the watchdog or a kill ends it)
                time.sleep(3600)
        if self.fire("spike", step):  # the vocabulary's last (rarest) token, over and over
            return {**batch, "tokens": np.full_like(batch["tokens"], vocab_size - 1)}
        return batch
