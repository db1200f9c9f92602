"""`keel plan --plot PLAN.png`: predicted MFU (every remat policy) and memory per device (the policy with the best
feasible MFU at each mesh, by part, against the usable HBM), one column per (data x fsdp x tensor) mesh.
matplotlib is imported here only (drawn without a display: a bare Figure renders through Agg)."""

from __future__ import annotations

from pathlib import Path

from keel.diag.specs import AcceleratorSpec
from keel.plan.step import REMAT_POLICIES, PlanRow

MARKERS = {"full": "o", "dots_no_batch": "s", "dots": "^", "none": "D"}
PARTS = (("parameters", "#1f77b4"), ("optimizer", "#aec7e8"), ("gradients", "#ff7f0e"),
         ("activations", "#2ca02c"), ("fsdp_buffers", "#9467bd"), ("muon", "#8c564b"))


def plot_plan(rows: list[PlanRow], spec: AcceleratorSpec, chips: int, path: str | Path, title: str = "",
              reserve: float = 0.1) -> None:
    from matplotlib.figure import Figure

    meshes = sorted({(r.mesh["tensor"], r.mesh["data"], r.label) for r in rows})
    x_of = {label: i for i, (_, _, label) in enumerate(meshes)}
    fig = Figure(figsize=(max(8.0, 0.32 * len(meshes) + 3), 7.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for policy in REMAT_POLICIES:
        mine = [r for r in rows if r.remat == policy]
        if not mine:
            continue
        for feasible in (True, False):
            pts = [r for r in mine if r.feasible is feasible]
            if pts:
                top.scatter([x_of[r.label] for r in pts], [100 * r.mfu for r in pts], marker=MARKERS[policy],
                            facecolors=None if feasible else "none", edgecolors="C0" if not feasible else None,
                            label=f"{policy}{'' if feasible else ' (does not fit)'}", s=28)
    best = next((r for r in rows if r.best), None)
    if best is not None:
        top.scatter([x_of[best.label]], [100 * best.mfu], marker="*", s=220, color="#d62728", zorder=5,
                    label=f"best: {best.label} {best.remat}")
    top.set_ylabel("predicted MFU %")
    top.legend(fontsize=7, ncol=2)
    top.grid(alpha=0.3)
    top.set_title(title or f"keel plan on {chips} x {spec.name}", fontsize=10)

    shown: dict[str, PlanRow] = {}
    for r in rows:  # per mesh: the feasible row with the best MFU, else the smallest
        cur = shown.get(r.label)
        key = (r.feasible, r.mfu if r.feasible else -r.memory.total)
        if cur is None or key > (cur.feasible, cur.mfu if cur.feasible else -cur.memory.total):
            shown[r.label] = r
    xs = [x_of[label] for label in shown]
    base = [0.0] * len(xs)
    for part, colour in PARTS:
        vals = [getattr(r.memory, part) / 1e9 for r in shown.values()]
        bottom.bar(xs, vals, bottom=base, color=colour, label=part, width=0.7)
        base = [b + v for b, v in zip(base, vals, strict=True)]
    usable = spec.hbm_gb * (1 - reserve)
    bottom.axhline(usable, color="#d62728", lw=1, ls="--", label=f"usable HBM {usable:.0f} GB")
    bottom.set_ylabel("GB per device (best policy)")
    bottom.set_ylim(0, min(max(base, default=usable), 3 * usable) * 1.05)
    bottom.legend(fontsize=7, ncol=3)
    bottom.grid(alpha=0.3, axis="y")
    bottom.set_xticks(range(len(meshes)), [label for _, _, label in meshes], rotation=70, fontsize=7)
    bottom.set_xlabel("mesh data x fsdp x tensor")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
