"""`keel plan`: memory, step time and MFU of a config for every mesh and remat policy on N accelerators; the
checkpoint interval; `--check` against the compiled train step on the local devices."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from keel.errors import ConfigError

if TYPE_CHECKING:
    from keel.config import Config
    from keel.diag.specs import AcceleratorSpec
    from keel.plan.step import PlanRow


def add_parser(sub: argparse._SubParsersAction) -> None:
    from keel.config import preset_names
    from keel.diag.specs import hardware_names

    p = sub.add_parser("plan", help="predict memory, step time and MFU of every mesh and remat policy",
                       description="Predict, for each (data x fsdp x tensor) mesh of --chips accelerators and each "
                                   "remat policy, the memory per device, the step time (compute, FSDP, "
                                   "tensor-parallel and Muon traffic, exposed vs overlapped), MFU and tokens/s; "
                                   "mark the fastest row that fits; advise a checkpoint interval. Nothing is "
                                   "compiled or allocated, except with --check. The model: docs/parallel.md.")
    p.add_argument("--config", action="append",
                   help=f"a preset ({', '.join(preset_names())}) or a YAML file; repeat to layer them (default: tiny)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.name=muon")
    p.add_argument("--hardware", default="h200", help=f"the accelerator: {', '.join(hardware_names())} (default h200)")
    p.add_argument("--chips", type=int, help="accelerators in the job (a v5p-256 slice is 128 chips); required "
                                             "except with --check")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's data.seq_len)")
    p.add_argument("--global-batch", help="sequences per step (512), or tokens (4M-tokens: K and M are binary) "
                                          "(default: the config's train.batch_size)")
    p.add_argument("--remat", default="full,dots_no_batch,dots,none",
                   help="remat policies to consider, comma-separated (default: all)")
    p.add_argument("--efficiency", type=float, default=None,
                   help="fraction of the bf16 peak the step's matmuls sustain (default 0.6; docs/parallel.md)")
    p.add_argument("--reserve", type=float, default=None,
                   help="fraction of HBM left to the runtime (default 0.1)")
    p.add_argument("--max-tensor", type=int, help="largest tensor-parallel axis to try (default: min(node, 16))")
    p.add_argument("--checkpoint-blocking-s", type=float,
                   help="measured blocking time of one checkpoint save (keel goodput reports it), for the "
                        "Young/Daly interval")
    p.add_argument("--mtbf-hours", type=float,
                   help="the job's mean time between failures (default: Llama 3's one per 2.78 h at 16,384 GPUs, "
                        "scaled by --chips)")
    p.add_argument("--top", type=int, default=20, help="rows to print (0: all; --json has all)")
    p.add_argument("--json", action="store_true", help="machine-readable output, every row")
    p.add_argument("--plot", metavar="PNG", help="also draw MFU and memory per device against the mesh")
    p.add_argument("--check", action="store_true",
                   help="compile the config's train step on the local devices (its own mesh) and print the "
                        "prediction beside XLA's memory, FLOPs and collectives")


def _config(args: argparse.Namespace) -> Config:
    from keel.config import load_config
    from keel.plan.step import parse_batch

    overrides = list(args.overrides)
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    cfg = load_config(args.config or ["tiny"], overrides)
    if args.global_batch:
        try:
            rows = parse_batch(args.global_batch, cfg.data.seq_len)
        except ValueError as e:
            raise ConfigError(f"--global-batch: {e}") from None
        cfg = load_config(args.config or ["tiny"], [*overrides, f"train.batch_size={rows}"])
    return cfg


def run(args: argparse.Namespace) -> int:
    from keel.diag.specs import named
    from keel.plan.checkpoint import default_mtbf_s, interval_advice
    from keel.plan.step import DEFAULT_EFFICIENCY, DEFAULT_RESERVE, REMAT_POLICIES, plan

    cfg = _config(args)
    if args.check:
        return _check(cfg, args)
    try:
        spec = named(args.hardware)
    except KeyError as e:
        raise ConfigError(f"--hardware: {e.args[0]}") from None
    if args.chips is None:
        raise ConfigError("keel plan needs --chips (the accelerators in the job)")
    chips = args.chips
    remat = [r.strip() for r in args.remat.split(",") if r.strip()]
    bad = [r for r in remat if r not in REMAT_POLICIES]
    if bad or not remat:
        raise ConfigError(f"--remat {args.remat!r}: choose from {', '.join(REMAT_POLICIES)}")
    efficiency = DEFAULT_EFFICIENCY if args.efficiency is None else args.efficiency
    reserve = DEFAULT_RESERVE if args.reserve is None else args.reserve
    if not 0 < efficiency <= 1 or not 0 <= reserve < 1 or chips < 1:
        raise ConfigError("--efficiency must be in (0, 1], --reserve in [0, 1), --chips >= 1")
    rows = plan(cfg, spec, chips, remat, efficiency, reserve, args.max_tensor)
    if not rows:
        raise ConfigError(f"no (data x fsdp x tensor) mesh of {chips} chips divides the global batch of "
                          f"{cfg.train.batch_size} sequences over data x fsdp")
    best = next((r for r in rows if r.best), None)
    mtbf_s = args.mtbf_hours * 3600 if args.mtbf_hours else default_mtbf_s(chips)
    advice = None
    if args.checkpoint_blocking_s:
        step_s = best.time.total_s if best else None
        advice = interval_advice(args.checkpoint_blocking_s, mtbf_s, step_s, cfg.checkpoint.every)
    if args.plot:
        from keel.plan.plot import plot_plan

        try:
            plot_plan(rows, spec, chips, args.plot, title=_title(cfg, spec, chips), reserve=reserve)
        except OSError as e:
            raise ConfigError(f"keel plan --plot {args.plot}: {e}") from None
    if args.json:
        print(json.dumps({"config": _summary(cfg), "hardware": spec.name, "chips": chips, "efficiency": efficiency,
                          "reserve": reserve, "rows": [r.to_json() for r in rows],
                          "checkpoint": advice.to_json() if advice else None, "mtbf_s": mtbf_s}, indent=1))
        return 0
    print(_title(cfg, spec, chips))
    print(f"compute at {efficiency:.0%} of {spec.bf16_tflops:g} TFLOP/s bf16; links {spec.node_gbps:g} GB/s inside "
          f"{spec.node_size}-device domains, {spec.network_gbps:g} GB/s between; {reserve:.0%} of "
          f"{spec.hbm_gb:.0f} GB HBM left to the runtime")
    print(table(rows, args.top))
    if best is None:
        print("\nno row fits: more chips, a shorter sequence, a smaller batch, or a stronger remat policy")
    else:
        print(f"\nbest: mesh {best.label} (data x fsdp x tensor), remat {best.remat}: "
              f"{best.tokens_per_s:,.0f} tokens/s, MFU {best.mfu:.1%}, {best.memory.total / 1e9:.1f} GB per device")
        for note in best.notes:
            print(f"  note: {note}")
    if advice:
        print(advice.line())
    else:
        print(f"checkpoint interval: pass --checkpoint-blocking-s (MTBF here {mtbf_s / 3600:.3g} h)")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _title(cfg: Config, spec: AcceleratorSpec, chips: int) -> str:
    from keel.model.transformer import count_params

    return (f"{count_params(cfg.model) / 1e9:.2f}B parameters, {cfg.train.batch_size} x {cfg.data.seq_len} tokens "
            f"per step, optimizer {cfg.optim.name}, on {chips} x {spec.name}")


def _summary(cfg: Config) -> dict[str, Any]:
    return {"seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size, "optimizer": cfg.optim.name,
            "param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype,
            "n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model}


def table(rows: list[PlanRow], top: int) -> str:
    """The rows as printed: the first `top` (0: all), best marked `*`, then a legend."""
    shown = rows if top <= 0 else rows[:top]
    head = (f"{'':1s} {'mesh d x f x t':>15s} {'remat':>13s} | {'GB/dev':>6s} {'param':>5s} {'opt':>5s} {'grad':>5s} "
            f"{'act':>6s} {'buf':>5s} {'muon':>5s} | {'step s':>7s} {'comp':>6s} {'fsdp':>6s} {'tp':>6s} "
            f"{'muon':>6s} {'expo':>6s} {'ovlp':>6s} | {'MFU':>5s} {'tok/s':>9s}  fits")
    lines = [head, "-" * len(head)]
    for r in shown:
        m, t = r.memory, r.time
        gb = [x / 1e9 for x in (m.total, m.parameters, m.optimizer, m.gradients, m.activations, m.fsdp_buffers,
                                m.muon)]
        lines.append(
            f"{'*' if r.best else ' '} {r.label:>15s} {r.remat:>13s} | {gb[0]:6.1f} {gb[1]:5.1f} {gb[2]:5.1f} "
            f"{gb[3]:5.1f} {gb[4]:6.1f} {gb[5]:5.1f} {gb[6]:5.1f} | {t.total_s:7.3f} {t.compute_s:6.3f} "
            f"{t.fsdp_s:6.3f} {t.tensor_s:6.3f} {t.muon_s:6.3f} {t.exposed_s:6.3f} {t.overlapped_s:6.3f} | "
            f"{r.mfu:5.1%} {r.tokens_per_s:9.0f}  {'yes' if r.feasible else 'no: ' + r.why_not}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows (--top 0 for all)")
    lines.append("GB/dev: predicted peak (param, opt, grad, act = saved stack + working set, buf = FSDP buffers, "
                 "muon); step s = comp + expo; fsdp/tp/muon: wire time; expo: exposed, ovlp: hidden behind compute")
    return "\n".join(lines)


def _check(cfg: Config, args: argparse.Namespace) -> int:
    from keel.plan.check import compare

    comparison = compare(cfg)
    if args.json:
        print(json.dumps(comparison.to_json(), indent=1))
    else:
        print(comparison.table())
    return 0
