"""`keel burnin fleet`: many nodes' burn-in reports side by side; which nodes to drain.

A node is drained when its own report is not a pass (a device slow against its spec or its neighbours, wrong,
or a check that could not run), or when the fleet shows what one node cannot see alone: the node's median of a
throughput metric is low against the other nodes with the same hardware (a whole node slow, e.g. a power cap
on every GPU), or one of its devices is low against every device of that hardware in the fleet.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.diag.verdicts import PASS, SCHEMA, robust_low


@dataclass
class NodeFinding:
    node: str
    kind: str
    devices: int
    own_verdict: str
    findings: list[str] = field(default_factory=list)

    @property
    def drain(self) -> bool:
        return self.own_verdict != PASS or bool(self.findings)


def load_reports(paths: list[str]) -> list[dict[str, Any]]:
    reports = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable burn-in report ({e})") from None
        if r.get("schema", "").split("/")[0] != SCHEMA.split("/")[0]:
            raise ValueError(f"{p}: schema {r.get('schema')!r} is not {SCHEMA}")
        r["_path"] = p
        reports.append(r)
    return reports


def _node_names(reports: list[dict[str, Any]]) -> list[str]:
    names = [r["host"] for r in reports]
    return [n if names.count(n) == 1 else f"{n} ({r['_path']})" for n, r in zip(names, reports, strict=True)]


def compare(reports: list[dict[str, Any]], tolerance: float = 0.10, z: float = 4.0) -> list[NodeFinding]:
    names = _node_names(reports)
    nodes = [NodeFinding(n, r["devices"][0]["kind"], len(r["devices"]), r["verdict"]) for n, r in
             zip(names, reports, strict=True)]
    # metric -> kind -> node -> {device: value}
    values: dict[tuple[str, str], dict[str, dict[str, dict[int, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for node, r in zip(nodes, reports, strict=True):
        for m in r["measurements"]:
            if m["device"] is not None and isinstance(m["value"], float) and m["unit"] in ("TFLOP/s", "GB/s"):
                values[(m["check"], m["metric"])][node.kind][node.node][m["device"]] = m["value"]
    by_name = {n.node: n for n in nodes}
    for (check, metric), kinds in values.items():
        for _kind, per_node in kinds.items():
            medians = {node: statistics.median(v.values()) for node, v in per_node.items()}
            for node, why in robust_low(medians, tolerance, z).items():
                by_name[node].findings.append(f"{check} {metric}: node median {medians[node]:.4g}, {why}")
            devices = {(node, d): v for node, dv in per_node.items() for d, v in dv.items()}
            for (node, d), why in robust_low(devices, tolerance, z).items():
                if node not in robust_low(medians, tolerance, z):
                    by_name[node].findings.append(f"{check} {metric}: device {d} {devices[(node, d)]:.4g}, {why}")
    return nodes


def table(nodes: list[NodeFinding]) -> str:
    head = ("node", "hardware", "devices", "own verdict", "action", "fleet findings")
    rows = [head] + [(n.node, n.kind, str(n.devices), n.own_verdict, "DRAIN" if n.drain else "keep",
                      "; ".join(n.findings) or "-") for n in nodes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1] for r in rows]
    drain = [n.node for n in nodes if n.drain]
    lines.append("")
    lines.append(f"drain: {' '.join(drain)}" if drain else f"drain: none ({len(nodes)} nodes pass)")
    return "\n".join(lines)
