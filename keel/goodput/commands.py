"""`keel goodput RUN_DIR`: goodput and where the rest of the wall time went, from the run's events."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("goodput", help="goodput % and a badput breakdown of a run, from its events",
                       description="Account for every second of a run's wall time (first start to last event) "
                                   "from events/hostNNNN.jsonl: productive steps, start-up, checkpoints, "
                                   "evaluation, wasted progress, recovery between attempts, data stalls, degraded "
                                   "steps, other. Also the Young/Daly checkpoint interval.")
    g.add_argument("run_dir", help="a keel run directory")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--mtbf-hours", type=float, default=3.0,
                   help="mean time between failures for the checkpoint-interval advice (default 3, as Llama 3's "
                        "466 interruptions in 54 days)")


def run(args: argparse.Namespace) -> int:
    from keel.errors import ConfigError
    from keel.goodput.account import account_run, young_daly
    from keel.train.events import read_events

    run_dir = Path(args.run_dir)
    try:
        hosts = account_run(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"keel goodput {run_dir}: {e}") from None
    events = read_events(run_dir / "events" / f"host{min(hosts):04d}.jsonl")
    saves = [e["duration_s"] for e in events if e["kind"] == "checkpoint_save"]
    steps = [e["duration_s"] for e in events if e["kind"] == "step"]
    advice = None
    if saves and steps:
        c, m = statistics.median(saves), args.mtbf_hours * 3600
        tau, overhead = young_daly(c, m)
        every = _checkpoint_every(run_dir)
        actual = every * statistics.median(steps) if every else None
        advice = {"checkpoint_blocking_s": c, "mtbf_s": m, "optimal_interval_s": tau, "optimal_overhead": overhead,
                  "optimal_every_steps": max(1, round(tau / statistics.median(steps))), "actual_interval_s": actual,
                  "actual_overhead": c / actual + actual / (2 * m) if actual else None}
    if args.json:
        print(json.dumps({"hosts": {h: b.to_json() for h, b in hosts.items()}, "checkpoint_interval": advice},
                         indent=1))
        return 0
    for h, b in hosts.items():
        print(f"host {h}: {b.table()}\n")
    if advice:
        a = advice
        print(f"checkpoint interval (Young/Daly, blocking save {a['checkpoint_blocking_s']:.3g} s, MTBF "
              f"{args.mtbf_hours:g} h): every {a['optimal_interval_s'] / 60:.1f} min (~{a['optimal_every_steps']} "
              f"steps), {100 * a['optimal_overhead']:.2f} % overhead before restart cost"
              + (f"; this run's interval {a['actual_interval_s'] / 60:.1f} min costs "
                 f"{100 * a['actual_overhead']:.2f} %" if a["actual_interval_s"] else ""))
    return 0


def _checkpoint_every(run_dir: Path) -> int | None:
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    return int((yaml.safe_load(path.read_text()) or {}).get("checkpoint", {}).get("every", 0)) or None
