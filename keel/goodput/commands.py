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
    from keel.goodput.account import account, host_events

    run_dir = Path(args.run_dir)
    try:
        events = host_events(run_dir)
        hosts = {h: account(ev) for h, ev in events.items()}
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"keel goodput {run_dir}: {e}") from None
    advice = _interval_advice(events[min(events)], _checkpoint_every(run_dir), args.mtbf_hours * 3600)
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


def _interval_advice(events: list[dict], every: int | None, mtbf_s: float) -> dict | None:
    """Young/Daly for the median blocking save, and what the run's own interval (`every` x the median step)
    costs; None without saves or steps."""
    from keel.goodput.account import checkpoint_overhead, young_daly

    saves = [e["duration_s"] for e in events if e["kind"] == "checkpoint_save"]
    steps = [e["duration_s"] for e in events if e["kind"] == "step"]
    if not saves or not steps:
        return None
    c, step = statistics.median(saves), statistics.median(steps)
    tau, overhead = young_daly(c, mtbf_s)
    actual = every * step if every else None
    return {"checkpoint_blocking_s": c, "mtbf_s": mtbf_s, "optimal_interval_s": tau, "optimal_overhead": overhead,
            "optimal_every_steps": max(1, round(tau / step)), "actual_interval_s": actual,
            "actual_overhead": checkpoint_overhead(c, actual, mtbf_s) if actual else None}


def _checkpoint_every(run_dir: Path) -> int | None:
    """`checkpoint.every` of the run's saved config, read with the config loader (None without one)."""
    from keel.config import from_dict

    path = run_dir / "config.yaml"
    return from_dict(yaml.safe_load(path.read_text())).checkpoint.every if path.exists() else None
