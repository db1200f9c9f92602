"""`keel burnin` and `keel burnin fleet`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from keel.diag.verdicts import CHECK_NAMES, EXIT_CODES
    from keel.parallel.distributed import add_distributed_args

    codes = ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items())
    b = sub.add_parser(
        "burnin", help="find slow, wrong and flaky accelerators (all local devices)",
        description=f"Run burn-in checks on every local device (and, under jax.distributed, compare result hashes "
                    f"across hosts). Exit codes: {codes}.")
    b.add_argument("--quick", action="store_true", help="smaller sizes and a short sustained run (<= 60 s)")
    b.add_argument("--checks", default=",".join(CHECK_NAMES),
                   help=f"comma-separated subset of: {', '.join(CHECK_NAMES)}")
    b.add_argument("--json", metavar="PATH", help="also write the versioned JSON report here ('-': stdout only)")
    b.add_argument("--no-progress", action="store_true")
    add_distributed_args(b)
    fsub = b.add_subparsers(dest="burnin_command")
    f = fsub.add_parser("fleet", help="compare many nodes' reports and say which nodes to drain",
                        description="Compare burn-in reports of many nodes (keel burnin --json); exit 10 if any "
                                    "node should be drained.")
    f.add_argument("reports", nargs="+", help="report JSON files, one per node")
    f.add_argument("--tolerance", type=float, default=0.10, help="fleet-relative: fraction below the median")
    f.add_argument("--z", type=float, default=4.0, help="fleet-relative: robust sigmas below the median")
    f.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.burnin_command == "fleet":
        return _fleet(args)
    from keel.config import ConfigError
    from keel.parallel.distributed import DistributedArgs, initialize

    initialize(DistributedArgs.from_namespace(args))
    from keel.diag.burnin import run_burnin

    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    try:
        report = run_burnin(checks, quick=args.quick, progress=not args.no_progress)
    except ValueError as e:
        raise ConfigError(f"--checks: {e}") from None
    doc = json.dumps(report.to_json(), indent=1)
    if args.json == "-":
        print(doc)
    else:
        print(report.table())
        if args.json:
            Path(args.json).write_text(doc)
    return report.exit_code()


def _fleet(args: argparse.Namespace) -> int:
    from keel.config import ConfigError
    from keel.diag import fleet

    try:
        nodes = fleet.compare(fleet.load_reports(args.reports), args.tolerance, args.z)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        json.dump({"nodes": [n.__dict__ | {"drain": n.drain} for n in nodes],
                   "drain": [n.node for n in nodes if n.drain]}, sys.stdout, indent=1)
        print()
    else:
        print(fleet.table(nodes))
    return 10 if any(n.drain for n in nodes) else 0
