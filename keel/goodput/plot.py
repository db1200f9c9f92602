"""`keel goodput --plot run.png`: the run's timeline, one row per host, beside its breakdown.

A row shows the host's attempts as bands, its steps coloured by what became of them (productive, degraded,
wasted, spike), its data stalls as a thin bar beneath, its start-up spans, saves, evaluations and custom badput,
the hang before a `hang` event, and markers for failures, hangs, restarts, the supervisor's records, spikes,
checkpoint fallbacks and failed saves. Beside it, the breakdown as one stacked bar. matplotlib is imported here
only (drawn without a display: a bare Figure renders through Agg).
"""

from __future__ import annotations

from pathlib import Path

from keel.goodput.account import BUCKETS, SPANS, Breakdown, StepTime, hang_window
from keel.goodput.attempts import Event, attempts_of, seconds

COLOURS = {"productive": "#2ca02c", "data_stall": "#1f77b4", "degraded": "#ff7f0e", "spike": "#e377c2",
           "wasted": "#d62728", "startup_data": "#dbdb8d", "startup_init": "#aec7e8", "startup_restore": "#9edae5",
           "startup_compile": "#7f7f7f", "checkpoint": "#bcbd22", "eval": "#17becf", "custom": "#8c564b",
           "hang": "#000000", "recovery": "#ffbb78", "other": "#e8e8e8"}
# kind: (marker, colour, legend)
MARKERS = {"failure": ("X", "#d62728", "failure"), "hang": ("v", "#000000", "hang"),
           "restart": (">", "#1f77b4", "restart"), "child_exit": ("s", "#7f7f7f", "child exit"),
           "spike": ("*", "#e377c2", "loss spike"), "rewind": ("<", "#9467bd", "rewind"),
           "sdc": ("P", "#8c564b", "silent data corruption"),
           "checkpoint_fallback": ("D", "#ff7f0e", "checkpoint fallback"),
           "checkpoint_failure": ("x", "#d62728", "failed save")}
UNITS = ((7200.0, 3600.0, "h"), (120.0, 60.0, "min"), (0.0, 1.0, "s"))


def step_class(t: StepTime) -> str:
    """The colour class of a step: its kind, or "degraded" for a kept step with an excess."""
    return "degraded" if t.kind == "productive" and t.excess_s > 0 else t.kind


def plot_run(events: list[Event], b: Breakdown, path: Path, title: str = "") -> None:
    """Draw the timeline of `events` and the breakdown `b` (account(events)) into `path` (PNG, or any format
    matplotlib knows by the suffix)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    attempts = attempts_of(events)
    start = min(a.t0 for a in attempts)
    _, scale, unit = next(u for u in UNITS if b.wall_s >= u[0])
    row = {h: i for i, h in enumerate(b.hosts)}
    classes = {(t.attempt, t.step): step_class(t) for t in b.step_times}
    merge = 1e-4 * max(b.wall_s, 1e-9)

    def x(t: float) -> float:
        return (t - start) / scale

    fig = Figure(figsize=(13, 2.2 + 0.55 * len(row)), layout="constrained")
    line, stack = fig.subplots(1, 2, width_ratios=[7, 1])
    bars_used: set[str] = set()
    marks: dict[str, tuple[list[float], list[float]]] = {}  # kind -> (x, y)
    for a in attempts:
        for h, evs in a.by_host.items():
            y = row[h]
            line.broken_barh([(x(evs[0]["t_wall"]), (evs[-1]["t_wall"] - evs[0]["t_wall"]) / scale)],
                             (y - 0.45, 0.9), facecolors="#f4f4f4" if a.number % 2 else "#e4ecf4", zorder=0)
            line.text(x(evs[0]["t_wall"]), y - 0.43, f" attempt {a.number}", fontsize=6, va="top", color="#555555")
            bars: list[tuple[float, float, str]] = []
            for e in evs:
                k = e["kind"]
                if k == "step":
                    cls = classes.get((a.number, e.get("step")), "productive")
                    t1 = x(e["t_wall"])
                    t0 = t1 - seconds(e, "duration_s") / scale
                    bars.append((t0, t1, cls))
                    wait = seconds(e, "data_wait_s") / scale
                    if wait > 0:
                        bars.append((t0, t0 + wait, "data_stall"))
                elif k in SPANS:
                    bars.append((x(e["t_wall"]) - seconds(e, "duration_s") / scale, x(e["t_wall"]),
                                 SPANS[k]))
            window = hang_window(evs)
            if window:
                bars.append((x(window[0]), x(window[1]), "hang"))
            for cls, segments in _merged(bars, merge / scale).items():
                band = (y + 0.2, 0.15) if cls == "data_stall" else (y - 0.3, 0.5)
                line.broken_barh(segments, band, facecolors=COLOURS[cls], zorder=2)
                bars_used.add(cls)
            for e in evs:
                if e["kind"] in MARKERS:
                    xs, ys = marks.setdefault(e["kind"], ([], []))
                    xs.append(x(e["t_wall"]))
                    ys.append(y - 0.38)
    for kind, (xs, ys) in marks.items():
        marker, colour, _ = MARKERS[kind]
        line.plot(xs, ys, marker=marker, color=colour, markersize=7, zorder=3, linestyle="none")
    line.set_yticks(range(len(row)), [f"host {h}" for h in row])
    line.set_ylim(len(row) - 0.5, -0.6)
    line.set_xlim(0, b.wall_s / scale)
    line.set_xlabel(f"{unit} since the run's first event")
    line.set_title(f"{title}  goodput {100 * b.goodput:.1f} % of {b.wall_s / scale:,.1f} {unit}".strip(),
                   fontsize=10, loc="left")
    handles = [Patch(color=c, label=k.replace("_", " ")) for k, c in COLOURS.items() if k in bars_used]
    handles += [Line2D([], [], marker=m, color=c, linestyle="none", label=label)
                for k, (m, c, label) in MARKERS.items() if k in marks]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(9, len(handles) or 1), fontsize=7,
               frameon=False)

    bottom = 0.0
    for k in BUCKETS:
        share = 100 * b.buckets[k] / b.wall_s if b.wall_s else 0.0
        if share <= 0:
            continue
        stack.bar([0], [share], bottom=bottom, color=COLOURS[k], edgecolor="white", linewidth=0.5,
                  label=f"{k} {share:.1f} %")
        bottom += share
    stack.set_xticks([])
    stack.set_ylim(0, max(100.0, bottom))
    stack.set_ylabel("% of wall time")
    stack.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False, reverse=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _merged(bars: list[tuple[float, float, str]], gap: float) -> dict[str, list[tuple[float, float]]]:
    """Per class, (start, width) segments, neighbours of a class closer than `gap` drawn as one (a long run's
    steps become a few rectangles)."""
    out: dict[str, list[list[float]]] = {}
    for t0, t1, cls in sorted(bars):
        segs = out.setdefault(cls, [])
        if segs and t0 <= segs[-1][1] + gap:
            segs[-1][1] = max(segs[-1][1], t1)
        else:
            segs.append([t0, t1])
    return {cls: [(a, b - a) for a, b in segs] for cls, segs in out.items()}
