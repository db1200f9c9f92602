"""Peak numbers of accelerators, from their vendors' data sheets (dense, no sparsity).

`match` finds a row from JAX's `device_kind` string. CPUs have no row: their peak is measured, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AcceleratorSpec:
    name: str
    kinds: tuple[str, ...]  # lower-case substrings of jax.Device.device_kind
    bf16_tflops: float
    fp8_tflops: float | None
    hbm_tbps: float


SPECS: tuple[AcceleratorSpec, ...] = (
    # NVIDIA H200 SXM data sheet: 989 TFLOP/s BF16 and 1,979 FP8 dense (half the "with sparsity" figures),
    # 4.8 TB/s HBM3e.
    AcceleratorSpec("H200", ("h200",), 989.4, 1978.9, 4.8),
    # NVIDIA H100 SXM data sheet: 989 BF16 / 1,979 FP8 dense, 3.35 TB/s HBM3.
    AcceleratorSpec("H100", ("h100",), 989.4, 1978.9, 3.35),
    # NVIDIA HGX B200 data sheet: 2.25 PFLOP/s BF16 and 4.5 FP8 dense per GPU, 8 TB/s HBM3e.
    AcceleratorSpec("B200", ("b200",), 2250.0, 4500.0, 8.0),
    # AMD Instinct MI300X data sheet: 1,307.4 TFLOP/s BF16 and 2,614.9 FP8 dense, 5.3 TB/s HBM3.
    AcceleratorSpec("MI300X", ("mi300x",), 1307.4, 2614.9, 5.3),
    # Google Cloud TPU v6e (Trillium) docs: 918 TFLOP/s BF16 per chip, 1,640 GB/s HBM.
    AcceleratorSpec("TPU v6e", ("tpu v6 lite", "tpu v6e"), 918.0, None, 1.64),
    # Google Cloud TPU v5p docs: 459 TFLOP/s BF16 per chip, 2,765 GB/s HBM.
    AcceleratorSpec("TPU v5p", ("tpu v5p", "tpu v5"), 459.0, None, 2.765),
    # Google Cloud TPU v5e docs: 197 TFLOP/s BF16 per chip, 819 GB/s HBM.
    AcceleratorSpec("TPU v5e", ("tpu v5 lite", "tpu v5e"), 197.0, None, 0.819),
    # Google Cloud TPU v4 docs: 275 TFLOP/s BF16 per chip, 1,200 GB/s HBM.
    AcceleratorSpec("TPU v4", ("tpu v4",), 275.0, None, 1.2),
)


def match(device_kind: str) -> AcceleratorSpec | None:
    kind = device_kind.lower()
    # "tpu v5 lite" must not be taken for v5p's "tpu v5": try longer patterns first.
    pairs = sorted(((p, s) for s in SPECS for p in s.kinds), key=lambda ps: -len(ps[0]))
    return next((s for p, s in pairs if p in kind), None)
