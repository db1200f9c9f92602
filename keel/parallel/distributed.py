"""Multi-host initialisation: one `keel train` process per host, joined by `jax.distributed`.

Explicit flags win; otherwise the standard variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (set by `deploy/jobset.yaml`); otherwise `--distributed auto` lets JAX detect the cluster
(SLURM, Open MPI, TPU pods); with none of these the run is single-process.

`keel train` and `keel burnin` take the same flags, defined once by `add_distributed_args`. This module imports
JAX only in `initialize`, so building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from keel.config import ConfigError


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags, as a group of `parser`; read them back with `DistributedArgs.from_namespace`."""
    d = parser.add_argument_group(
        "multi-host (default: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    d.add_argument("--coordinator", help="host:port of process 0")
    d.add_argument("--num-processes", type=int, help="processes in the job (one per host)")
    d.add_argument("--process-id", type=int, help="this process's index")
    d.add_argument("--distributed", choices=["auto"], help="auto: let JAX detect the cluster (SLURM, MPI, TPU)")


@dataclass(frozen=True)
class DistributedArgs:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def given(self) -> bool:
        """Whether a multi-process job is described (then `initialize` joins it)."""
        return self.auto or any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> DistributedArgs:
        """The flags of `add_distributed_args` as parsed."""
        return cls(args.coordinator, args.num_processes, args.process_id, args.distributed == "auto")


def from_environment(args: DistributedArgs) -> DistributedArgs:
    env = os.environ
    return DistributedArgs(
        coordinator=args.coordinator or env.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=args.num_processes if args.num_processes is not None else _int_env("JAX_NUM_PROCESSES"),
        process_id=args.process_id if args.process_id is not None else _int_env("JAX_PROCESS_ID"),
        auto=args.auto,
    )


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from e


def initialize(args: DistributedArgs) -> bool:
    """Joins the job if one is described; returns whether this is a multi-process run."""
    import jax

    args = from_environment(args)
    if not args.given:
        return False
    if not args.auto and any(v is None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ConfigError(
            "multi-host needs all of --coordinator/JAX_COORDINATOR_ADDRESS, --num-processes/JAX_NUM_PROCESSES "
            f"and --process-id/JAX_PROCESS_ID; got {args}"
        )
    # Cross-process collectives on CPU (tests, development) go through gloo; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    return jax.process_count() > 1
