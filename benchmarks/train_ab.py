"""The default run's speed at two git revisions, interleaved on this machine: is a change to the loop slower?

    python benchmarks/train_ab.py 5718a68 HEAD --steps 200 --repeats 3

Each revision is checked out in a temporary worktree and run with this checkout's interpreter
(`python -m keel train` with that worktree first on PYTHONPATH), A B A B ...; both share one prebuilt token
store (copied into each run directory, so no run pays for the BPE). Printed: per run its wall time, loop time
(compile end -> last step) and median step time from the run's events, then the B/A ratios of the means, and
whether the held-out losses are bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(src: Path, run_dir: Path, store: Path, overrides: list[str]) -> dict[str, float]:
    shutil.copytree(store, run_dir / "data" / store.name)
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, "-m", "keel", "train", "--no-progress", f"run_dir={run_dir}", *overrides],
                         cwd=src, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"keel train in {src} exited {out.returncode}:\n{out.stderr[-2000:]}")
    events = [json.loads(line) for line in (run_dir / "events" / "host0000.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "step"]
    compiled = next(e for e in events if e["kind"] == "compile")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": summary["wall_s"], "loop_s": steps[-1]["t_mono"] - compiled["t_mono"],
            "median_step_s": statistics.median(e["duration_s"] for e in steps), "heldout": summary["heldout_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="the reference revision")
    p.add_argument("b", help="the revision measured against it")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    overrides = [f"train.steps={args.steps}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {}
        for name, rev in (("A", args.a), ("B", args.b)):
            trees[name] = tmp / f"tree-{name}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(trees[name]), rev],
                           check=True)
        try:
            print("building the shared token store once ...", flush=True)
            first = tmp / "store-run"
            subprocess.run([sys.executable, "-m", "keel", "train", "--no-progress", f"run_dir={first}",
                            "train.steps=1", "optim.warmup_steps=0", "optim.decay_fraction=0", "train.eval_every=1"],
                           cwd=trees["B"], env=dict(os.environ, PYTHONPATH=str(trees["B"])), check=True,
                           stdout=subprocess.DEVNULL)
            store = next((first / "data").iterdir())
            results: dict[str, list[dict]] = {"A": [], "B": []}
            for i in range(args.repeats):
                for name in ("A", "B"):
                    r = run_once(trees[name], tmp / f"run-{name}-{i}", store, overrides)
                    results[name].append(r)
                    print(f"{name} #{i}: wall {r['wall_s']:.1f} s, loop {r['loop_s']:.1f} s, "
                          f"median step {r['median_step_s'] * 1e3:.1f} ms", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\n| {args.steps} steps, {args.repeats} runs each | A {args.a} | B {args.b} | B / A |")
    print("|---|---|---|---|")
    for key in ("wall_s", "loop_s", "median_step_s"):
        a = statistics.mean(r[key] for r in results["A"])
        b = statistics.mean(r[key] for r in results["B"])
        print(f"| mean {key} | {a:.4g} | {b:.4g} | {b / a:.3f} |")
    same = {r["heldout"] for r in results["A"]} == {r["heldout"] for r in results["B"]}
    print(f"held-out loss bitwise equal across all runs: {same}")


if __name__ == "__main__":
    main()
