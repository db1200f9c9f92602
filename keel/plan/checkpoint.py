"""How often to checkpoint: Young/Daly from a measured blocking save time and the job's mean time between
failures (MTBF), with `keel.goodput.account`'s `young_daly` and `checkpoint_overhead`.

The default MTBF comes from the Llama 3 report (Dubey et al. 2024, section 3.3.4): 466 job interruptions in a
54-day snapshot of training on 16,384 H100 GPUs, one per 2.78 h. Interruptions scale with the hardware in the
job, so a job on N chips sees one every 2.78 h x 16,384 / N.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from keel.goodput.account import checkpoint_overhead, young_daly

LLAMA3_INTERRUPTIONS = 466
LLAMA3_DAYS = 54
LLAMA3_GPUS = 16_384


def default_mtbf_s(chips: int) -> float:
    """The job's MTBF on `chips` accelerators, scaled from Llama 3's 54 days / 466 interruptions at 16,384 GPUs."""
    return LLAMA3_DAYS * 86_400 / LLAMA3_INTERRUPTIONS * LLAMA3_GPUS / chips


@dataclass(frozen=True)
class IntervalAdvice:
    blocking_s: float
    mtbf_s: float
    interval_s: float
    every_steps: int | None
    badput: float  # saves + half an interval of lost work per failure, as a fraction of wall time (no restart cost)
    configured_every: int | None = None
    configured_badput: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        steps = f" (~{self.every_steps} steps)" if self.every_steps else ""
        out = (f"checkpoint every {self.interval_s / 60:.1f} min{steps}: Young/Daly for a {self.blocking_s:g} s "
               f"blocking save and an MTBF of {self.mtbf_s / 3600:.3g} h; badput {100 * self.badput:.2f} % "
               f"before restart cost")
        if self.configured_every and self.configured_badput is not None:
            out += f"; the config's every {self.configured_every} steps: {100 * self.configured_badput:.2f} %"
        return out


def interval_advice(blocking_s: float, mtbf_s: float, step_s: float | None = None,
                    configured_every: int | None = None) -> IntervalAdvice:
    """Young/Daly's interval tau = sqrt(2 C M) for a blocking save of C seconds and an MTBF of M, its badput
    C / tau + tau / (2 M), and, with a step time, the interval in steps and the badput of `configured_every`."""
    if blocking_s <= 0 or mtbf_s <= 0:
        raise ValueError("the blocking save time and the MTBF must be > 0")
    tau, badput = young_daly(blocking_s, mtbf_s)
    every = max(1, round(tau / step_s)) if step_s else None
    configured = (checkpoint_overhead(blocking_s, configured_every * step_s, mtbf_s)
                  if step_s and configured_every else None)
    return IntervalAdvice(blocking_s, mtbf_s, tau, every, badput, configured_every, configured)
