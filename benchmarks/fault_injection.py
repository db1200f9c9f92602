"""Fault-injected training run (run by hand): `keel train` (default model unless overridden) under random
SIGKILLs, one hang, one corrupted latest checkpoint and one loss spike (rewind policy); then the checks of
keel/train/chaos.py, an uninterrupted reference run given the same skip decisions, a bitwise comparison of the
final parameters, and `keel goodput` (table, JSON, plot).

    python benchmarks/fault_injection.py --kills 10 --out runs/chaos [key=value ...]

Prints the goodput breakdown, the kills, the median time from a kill to the next productive step, and writes
OUT/report.json and OUT/chaos.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=500, help="train.steps (default: the default run's 500)")
    p.add_argument("--every", type=int, default=25, help="checkpoint.every (kills come within 2x of it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/chaos")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    a = p.parse_args()

    from keel.config import load_config
    from keel.train.chaos import check_chaos, reference_args, run_chaos
    from keel.train.checkpoint import load_params

    out = Path(a.out).resolve()
    chaos_dir = out / "chaos"
    args = [f"run_dir={chaos_dir}", f"train.steps={a.steps}", f"checkpoint.every={a.every}", "spike.policy=rewind",
            "train.hang_floor_s=10", *a.overrides]
    hang_at, spike_at = int(a.steps * 0.3), int(a.steps * 0.6) + 1
    report = run_chaos(args, chaos_dir, kills=a.kills, steps=a.steps, seed=a.seed, hang_at=hang_at,
                       spike_at=spike_at, corrupt_at_kill=a.kills // 3, max_gap_steps=2 * a.every, say=print)
    print(f"chaos run: exit {report.returncode} in {report.wall_s:.1f} s")
    if report.returncode != 0:
        print(report.log[-3000:])
        return 1
    check = check_chaos(chaos_dir, report)
    ref = reference_args(args, out / "reference", check.decisions)
    done = subprocess.run([sys.executable, "-m", "keel", "train", "--no-progress", *ref], capture_output=True,
                          text=True)
    if done.returncode:
        print(done.stderr[-3000:])
        return 1
    cfg = load_config("tiny", args)
    x, _ = load_params(chaos_dir, cfg)
    y, _ = load_params(out / "reference", cfg)
    bitwise = all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), x, y)))
    goodput = subprocess.run([sys.executable, "-m", "keel", "goodput", str(chaos_dir), "--json", "--plot",
                              str(out / "chaos.png")], capture_output=True, text=True, check=True)
    table = subprocess.run([sys.executable, "-m", "keel", "goodput", str(chaos_dir)], capture_output=True,
                           text=True, check=True).stdout
    result = {"kills": report.kills, "corrupted": report.corrupted, "wall_s": report.wall_s,
              "lost": check.lost, "restores": check.restores, "attempts": check.attempts,
              "set_aside": check.set_aside, "decisions": check.decisions, "bitwise_equal": bitwise,
              "recovery_s": check.recovery_s, "goodput": json.loads(goodput.stdout)}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    print(table)
    kinds = {k: sum(x["kind"] == k for x in report.kills) for k in ("startup", "step", "save")}
    print(f"kills {len(report.kills)} {kinds}; corrupted checkpoint {report.corrupted}; attempts {check.attempts}; "
          f"set aside {check.set_aside}; skip decisions {[d['steps'] for d in check.decisions]}")
    if check.recovery_s:
        print(f"kill -> next productive step: median {statistics.median(check.recovery_s):.1f} s, "
              f"max {max(check.recovery_s):.1f} s over {len(check.recovery_s)} kills")
    print(f"lost checkpoints: {check.lost or 'none'}; final parameters bitwise equal to the reference: {bitwise}")
    print(f"wrote {out / 'report.json'} and {out / 'chaos.png'}")
    return 0 if bitwise and not check.lost else 1


if __name__ == "__main__":
    sys.exit(main())
