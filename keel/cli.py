"""The `keel` command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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
    args.log_dir = str(Path(cfg.run_dir) / "logs")  # where a crash's traceback goes
    if args.dry_run:
        return dry_run(cfg)
    from keel.parallel.distributed import DistributedArgs, from_environment, initialize

    dist = DistributedArgs.from_namespace(args)
    if not args.supervised and cfg.train.max_restarts > 0 and not from_environment(dist).given:
        from keel.train.supervise import supervise  # no JAX in the supervising process

        return supervise(args.argv, Path(cfg.run_dir), cfg.train.max_restarts, cfg.train.restart_backoff_s)
    from keel.train.loop import train  # jax and friends load only once the config is known to be good

    initialize(dist)
    summary = train(cfg, progress=not args.no_progress, allow_config_change=args.allow_config_change,
                    restart_from_scratch=args.restart_from_scratch)
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
    from keel.train.fit import fit_report

    print(fit_report(cfg)[1])  # the predicted bytes per device against this machine's devices
    return 0


# The other commands live in their packages, imported only when run (so `keel train` does not load them):
# command -> (module, function).
LAZY_COMMANDS = {
    "data": ("keel.data.commands", "run"), "burnin": ("keel.diag.commands", "run"),
    "goodput": ("keel.goodput.commands", "run"), "plan": ("keel.plan.commands", "run"),
    "generate": ("keel.evaluate.commands", "run_generate"), "eval": ("keel.evaluate.commands", "run_eval"),
    "export": ("keel.interop.commands", "run_export"), "import": ("keel.interop.commands", "run_import"),
}


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, **{name: _lazy(*where) for name, where in LAZY_COMMANDS.items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="LLM pretraining in JAX, engineered for goodput.")
    parser.add_argument("--debug", action="store_true",
                        help="let a crash raise with its full traceback (default: one line, the traceback to a file)")
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
    t.add_argument("--restart-from-scratch", action="store_true",
                   help="train from step 0 although the run directory's events show checkpoints that are gone")
    t.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)  # the supervisor's child
    from keel.data import commands as data_commands
    from keel.diag import commands as diag_commands
    from keel.parallel.distributed import add_distributed_args

    add_distributed_args(t)
    from keel.goodput import commands as goodput_commands
    from keel.plan import commands as plan_commands

    data_commands.add_parser(sub)
    diag_commands.add_parser(sub)
    goodput_commands.add_parser(sub)
    plan_commands.add_parser(sub)
    from keel.evaluate import commands as evaluate_commands

    evaluate_commands.add_parsers(sub)
    from keel.interop import commands as interop_commands

    interop_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. An error a user can act on is one line on stderr and its exit code; a crash is one line
    too, with its full traceback written to `run_dir/logs/` (or a temporary folder) — or raised as it is with
    `--debug` / KEEL_DEBUG=1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides (key=value) may come after options too: `keel import HF --run-dir R train.steps=10`
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # the command's own arguments, as given (the supervisor passes them on to its child)
    args.argv = argv[argv.index(args.command) + 1:]
    debug = args.debug or os.environ.get("KEEL_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except KeelError as e:
        if debug:
            raise
        cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        details = f" (the underlying error's traceback: {_write_traceback(args, e)})" if cause else ""
        print(f"keel: {e.kind}: {e}{details}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"keel: crash: {type(e).__name__}: {first}\nkeel: the full traceback is in "
              f"{_write_traceback(args, e)}; rerun with --debug (or KEEL_DEBUG=1) to see it here", file=sys.stderr)
        return 1


def _write_traceback(args: argparse.Namespace, e: BaseException) -> Path:
    """The exception's full traceback in a file of `run_dir/logs/` (train) or a temporary folder; its path."""
    import tempfile
    import time
    import traceback

    folder = Path(getattr(args, "log_dir", None) or Path(tempfile.gettempdir()) / "keel-logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text("".join(traceback.format_exception(e)))
    return path


if __name__ == "__main__":
    sys.exit(main())
