"""Label (and taint) a Kubernetes node with its burn-in verdict: `python -m keel.diag.label --node N --report R`.

Run by deploy/burnin-daemonset.yaml after `keel burnin` on the node. Training pods select
`keel.dev/burnin=pass`; a node that did not pass also gets a NoSchedule taint, so nothing lands on it until
someone looks. Needs the official client (`pip install kubernetes`) and RBAC to patch nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

LABEL = "keel.dev/burnin"
TAINT_KEY = "keel.dev/burnin-failed"


def node_patch(report: dict[str, Any], existing_taints: list[dict[str, Any]], now: float | None = None) -> dict:
    """The strategic-merge patch for a node: verdict label, time label, and the taint set or cleared."""
    verdict = report["verdict"]
    taints = [t for t in existing_taints if t.get("key") != TAINT_KEY]
    if verdict != "pass":
        taints.append({"key": TAINT_KEY, "value": verdict, "effect": "NoSchedule"})
    return {"metadata": {"labels": {LABEL: verdict, f"{LABEL}-time": str(int(now or time.time()))}},
            "spec": {"taints": taints}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--node", required=True)
    ap.add_argument("--report", required=True, help="the node's `keel burnin --json` report")
    args = ap.parse_args(argv)
    try:
        from kubernetes import client, config
    except ImportError:
        print("keel.diag.label needs the Kubernetes client: pip install kubernetes", file=sys.stderr)
        return 2
    report_path = Path(args.report)
    report = json.loads(report_path.read_text()) if report_path.exists() else {"verdict": "could_not_run"}
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CoreV1Api()
    node = api.read_node(args.node)
    existing = [t.to_dict() for t in (node.spec.taints or [])]
    api.patch_node(args.node, node_patch(report, existing))
    print(f"{args.node}: {LABEL}={report['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
