"""Multi-host initialisation: one `keel train` process per host, joined by `jax.distributed`.

Explicit flags win; otherwise the standard variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (set by `deploy/jobset.yaml`); otherwise `--distributed auto` lets JAX detect the cluster
(SLURM, Open MPI, TPU pods); with none of these the run is single-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax

from keel.config import ConfigError


@dataclass(frozen=True)
class DistributedArgs:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False


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
    args = from_environment(args)
    given = [args.coordinator, args.num_processes, args.process_id]
    if not args.auto and all(v is None for v in given):
        return False
    if not args.auto and any(v is None for v in given):
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
