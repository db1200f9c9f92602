"""`keel goodput RUN_DIR`: goodput and where the rest of the wall time went, from the run's events."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("goodput", help="goodput % and a badput breakdown of a run, from its events",
                       description="Account for every second of a run's wall time (first start to last event on "
                                   "any host) from events/hostNNNN.jsonl: productive steps, start-up, checkpoints, "
                                   "evaluation, custom badput, wasted progress, spikes, hangs, recovery between "
                                   "attempts, data stalls, degraded steps, other. Several hosts: the slowest host "
                                   "sets each step. Also restarts, stragglers, incidents and the Young/Daly "
                                   "checkpoint interval.")
    g.add_argument("run_dir", help="a keel run directory")
    g.add_argument("--json", action="store_true", help="machine-readable output (with every host's breakdown)")
    g.add_argument("--hosts", action="store_true", help="also print each host's own breakdown")
    g.add_argument("--plot", metavar="PNG", help="also draw the run's timeline and breakdown into this file")
    g.add_argument("--mtbf-hours", type=float, default=3.0,
                   help="mean time between failures for the checkpoint-interval advice (default 3, as Llama 3's "
                        "466 interruptions in 54 days)")


def run(args: argparse.Namespace) -> int:
    from keel.errors import ConfigError
    from keel.goodput.account import account
    from keel.goodput.attempts import host_events

    run_dir = Path(args.run_dir)
    try:
        by_host = host_events(run_dir)
        events = [e for evs in by_host.values() for e in evs]
        whole = account(events)
        hosts = {h: account(evs) for h, evs in by_host.items()} if len(by_host) > 1 else {min(by_host): whole}
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"keel goodput {run_dir}: {e}") from None
    advice = interval_advice(whole.median_save_s, whole.median_step_s, _checkpoint_every(run_dir),
                             args.mtbf_hours * 3600)
    if args.plot:
        from keel.goodput.plot import plot_run

        try:
            plot_run(events, whole, Path(args.plot), title=str(run_dir))
        except OSError as e:
            raise ConfigError(f"keel goodput --plot {args.plot}: {e}") from None
    if args.json:
        print(json.dumps({"run": whole.to_json(), "hosts": {h: b.to_json() for h, b in hosts.items()},
                          "checkpoint_interval": advice}, indent=1))
        return 0
    print(whole.table())
    if args.hosts and len(hosts) > 1:
        for h, b in hosts.items():
            print(f"\nhost {h}: {b.table()}")
    if advice:
        a = advice
        print(f"\ncheckpoint interval (Young/Daly, blocking save {a['checkpoint_blocking_s']:.3g} s, MTBF "
              f"{args.mtbf_hours:g} h): every {a['optimal_interval_s'] / 60:.1f} min (~{a['optimal_every_steps']} "
              f"steps), {100 * a['optimal_overhead']:.2f} % overhead before restart cost"
              + (f"; this run's interval {a['actual_interval_s'] / 60:.1f} min costs "
                 f"{100 * a['actual_overhead']:.2f} %" if a["actual_interval_s"] else ""))
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


def interval_advice(save_s: float | None, step_s: float | None, every: int | None,
                    mtbf_s: float) -> dict[str, Any] | None:
    """Young/Daly for a blocking save of `save_s` (the run's median), and what the run's own interval (`every` x
    the median step `step_s`) costs; None without saves or steps."""
    from keel.goodput.account import checkpoint_overhead, young_daly

    if not save_s or not step_s:
        return None
    tau, overhead = young_daly(save_s, mtbf_s)
    actual = every * step_s if every else None
    return {"checkpoint_blocking_s": save_s, "mtbf_s": mtbf_s, "optimal_interval_s": tau,
            "optimal_overhead": overhead, "optimal_every_steps": max(1, round(tau / step_s)),
            "actual_interval_s": actual,
            "actual_overhead": checkpoint_overhead(save_s, actual, mtbf_s) if actual else None}


def _checkpoint_every(run_dir: Path) -> int | None:
    """`checkpoint.every` of the run's saved config, read with the config loader (None without one)."""
    from keel.config import load_saved_config

    path = run_dir / "config.yaml"
    return load_saved_config(path).checkpoint.every if path.exists() else None
