"""The `keel` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from keel.config import load_config, preset_names
from keel.errors import KeelError


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config or ["tiny"], args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    from keel.parallel.distributed import DistributedArgs, from_environment, initialize

    dist = DistributedArgs.from_namespace(args)
    if not args.supervised and cfg.train.max_restarts > 0 and not from_environment(dist).given:
        from pathlib import Path

        from keel.train.supervise import supervise  # no JAX in the supervising process

        return supervise(args.argv, Path(cfg.run_dir), cfg.train.max_restarts, cfg.train.restart_backoff_s)
    from keel.train.loop import train  # jax and friends load only once the config is known to be good

    initialize(dist)
    summary = train(cfg, progress=not args.no_progress, allow_config_change=args.allow_config_change)
    import jax

    if jax.process_index() == 0:
        print(summary.table())
    return summary.exit_code


def dry_run(cfg) -> int:
    """What the run would be, from abstract shapes alone: nothing is allocated, no data is read."""
    from keel.model import transformer
    from keel.train.state import abstract_state, state_bytes

    abstract = abstract_state(cfg)
    n_params = transformer.count_params(cfg.model)
    flops = transformer.model_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    print(f"parameters:        {n_params:,} ({_human(n_params)})")
    print(f"train state:       {state_bytes(abstract) / 2**30:.2f} GiB (params + optimizer state)")
    print(f"FLOPs per token:   {_human(flops)} (training, 6N + attention)")
    print(f"tokens per step:   {tokens:,}; whole run {_human(tokens * cfg.train.steps)} tokens, "
          f"{_human(flops * tokens * cfg.train.steps)} FLOPs")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from keel.data import commands

    return commands.run(args)


def cmd_burnin(args: argparse.Namespace) -> int:
    from keel.diag import commands

    return commands.run(args)


def cmd_goodput(args: argparse.Namespace) -> int:
    from keel.goodput import commands

    return commands.run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"train": cmd_train, "data": cmd_data,
                                                          "burnin": cmd_burnin, "goodput": cmd_goodput}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="LLM pretraining in JAX, engineered for goodput.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (default: the tiny model on the Python standard library)",
                       description="Train a model. Running it again on the same run_dir resumes the run.")
    t.add_argument("--config", action="append",
                   help=f"a preset ({', '.join(preset_names())}) or a YAML file; repeat to layer them, "
                        "e.g. --config tiny --config fsdp (default: tiny)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=100")
    t.add_argument("--dry-run", action="store_true",
                   help="print parameter count, state size and FLOPs from abstract shapes; allocate nothing")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume a run directory although its saved config differs")
    t.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)  # the supervisor's child
    from keel.data import commands as data_commands
    from keel.diag import commands as diag_commands
    from keel.parallel.distributed import add_distributed_args

    add_distributed_args(t)
    from keel.goodput import commands as goodput_commands

    data_commands.add_parser(sub)
    diag_commands.add_parser(sub)
    goodput_commands.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the command's own arguments, as given (the supervisor passes them on to its child)
    try:
        return COMMANDS[args.command](args)
    except KeelError as e:
        print(f"keel: {e.kind}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
