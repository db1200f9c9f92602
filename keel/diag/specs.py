"""Accelerators from their vendors' data sheets: peak FLOP/s (dense, no sparsity), HBM bandwidth and capacity,
and the links between devices (what `keel plan` needs to predict step time and memory).

`match` finds a row from JAX's `device_kind` string; `named` from a name a person types ("h200", "v5p").
CPUs have no row: their peak is measured, never assumed.

Link bandwidths are per device and one direction, in GB/s (1e9 bytes/s), as a collective on a ring over the
devices sees them:
- `node_gbps`: inside the fast domain of `node_size` devices. GPUs: NVLink/Infinity Fabric, the data sheet's
  bidirectional per-GPU figure halved. TPUs: the inter-chip interconnect (ICI) of a slice; a mesh axis laid along
  one torus dimension rides two of the chip's links (one to each neighbour), so a ring collective receives over
  two links at once: 2 x (the per-chip bidirectional ICI figure / links per chip / 2).
- `network_gbps`: between fast domains. GPUs: the 400 Gb/s InfiniBand/Ethernet NIC each GPU of the vendor's
  8-GPU system has (50 GB/s). TPUs: the data-center network (DCN) between slices, per chip.
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
    hbm_gb: float = 0.0
    """HBM capacity per device, GB (1e9 bytes)."""
    node_size: int = 1
    """Devices in one fast-interconnect domain: an 8-GPU NVLink node, a TPU pod (the largest ICI slice)."""
    node_gbps: float = 0.0
    """Per-device one-direction bandwidth of a ring collective inside the domain, GB/s (see the module doc)."""
    network_gbps: float = 0.0
    """Per-device one-direction bandwidth between domains, GB/s."""
    sources: tuple[str, ...] = ()
    """Where the numbers come from."""

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9


GIB = 2**30 / 1e9  # a GiB in GB: Google gives TPU v4 and v5p capacities in GiB

SPECS: tuple[AcceleratorSpec, ...] = (
    # NVIDIA H200 SXM data sheet: 989 TFLOP/s BF16 and 1,979 FP8 dense (half the "with sparsity" figures),
    # 4.8 TB/s HBM3e, 141 GB; NVLink 900 GB/s per GPU (bidirectional). DGX/HGX H200: 8 GPUs per node, eight
    # ConnectX-7 400 Gb/s adapters, one per GPU.
    AcceleratorSpec("H200", ("h200",), 989.4, 1978.9, 4.8, hbm_gb=141, node_size=8, node_gbps=450,
                    network_gbps=50, sources=("https://www.nvidia.com/en-us/data-center/h200/",
                                              "https://www.nvidia.com/en-us/data-center/dgx-h200/")),
    # NVIDIA H100 SXM data sheet: 989 BF16 / 1,979 FP8 dense, 3.35 TB/s HBM3, 80 GB; NVLink 900 GB/s per GPU.
    # DGX H100: 8 GPUs, eight ConnectX-7 400 Gb/s.
    AcceleratorSpec("H100", ("h100",), 989.4, 1978.9, 3.35, hbm_gb=80, node_size=8, node_gbps=450,
                    network_gbps=50, sources=("https://www.nvidia.com/en-us/data-center/h100/",
                                              "https://www.nvidia.com/en-us/data-center/dgx-h100/")),
    # NVIDIA HGX B200 data sheet: 2.25 PFLOP/s BF16 and 4.5 FP8 dense per GPU, 8 TB/s HBM3e, 1.44 TB for 8 GPUs
    # (180 GB each); fifth-generation NVLink 1.8 TB/s per GPU. DGX B200: eight ConnectX-7 400 Gb/s.
    AcceleratorSpec("B200", ("b200",), 2250.0, 4500.0, 8.0, hbm_gb=180, node_size=8, node_gbps=900,
                    network_gbps=50, sources=("https://www.nvidia.com/en-us/data-center/hgx/",
                                              "https://www.nvidia.com/en-us/data-center/dgx-b200/")),
    # AMD Instinct MI300X data sheet: 1,307.4 TFLOP/s BF16 and 2,614.9 FP8 dense, 5.3 TB/s HBM3, 192 GB; seven
    # Infinity Fabric links of 128 GB/s (bidirectional) to the other seven GPUs of an 8-GPU platform, all used
    # at once by a collective over the node (7 x 64 GB/s one way); one 400 Gb/s NIC per GPU.
    AcceleratorSpec("MI300X", ("mi300x",), 1307.4, 2614.9, 5.3, hbm_gb=192, node_size=8, node_gbps=448,
                    network_gbps=50,
                    sources=("https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
                             "https://www.amd.com/en/products/accelerators/instinct/mi300/platform.html")),
    # Google Cloud TPU v6e (Trillium) docs: 918 TFLOP/s BF16 per chip, 1,640 GB/s HBM, 32 GB; 256-chip pod, 2D
    # torus, 4 ICI ports, 800 GB/s bidirectional ICI per chip (100 GB/s per link each way: 200 along one torus
    # dimension); DCN 100 Gb/s per chip (scaling book, "How to think about TPUs").
    AcceleratorSpec("TPU v6e", ("tpu v6 lite", "tpu v6e"), 918.0, None, 1.64, hbm_gb=32, node_size=256,
                    node_gbps=200, network_gbps=12.5,
                    sources=("https://cloud.google.com/tpu/docs/v6e",
                             "https://jax-ml.github.io/scaling-book/tpus/")),
    # Google Cloud TPU v5p docs: 459 TFLOP/s BF16 per chip, 2,765 GB/s HBM, 95 GiB; 8,960-chip pod, 3D torus,
    # 1,200 GB/s bidirectional ICI per chip over 6 links (200 along one torus dimension); DCN 50 Gb/s per chip.
    AcceleratorSpec("TPU v5p", ("tpu v5p", "tpu v5"), 459.0, None, 2.765, hbm_gb=95 * GIB, node_size=8960,
                    node_gbps=200, network_gbps=6.25, sources=("https://cloud.google.com/tpu/docs/v5p",)),
    # Google Cloud TPU v5e docs: 197 TFLOP/s BF16 per chip, 819 GB/s HBM, 16 GB; 256-chip pod, 2D torus, 4 ICI
    # ports, 400 GB/s bidirectional ICI per chip (100 along one torus dimension); 2 x 100 Gb/s NICs per 8-chip
    # host (25 Gb/s per chip).
    AcceleratorSpec("TPU v5e", ("tpu v5 lite", "tpu v5e"), 197.0, None, 0.819, hbm_gb=16, node_size=256,
                    node_gbps=100, network_gbps=3.125, sources=("https://cloud.google.com/tpu/docs/v5e",)),
    # Google Cloud TPU v4 docs: 275 TFLOP/s BF16 per chip, 1,200 GB/s HBM, 32 GiB; 4,096-chip pod, 3D torus.
    # ICI: 6 links per chip at 50 GB/s each way (TPU v4 paper, ISCA 2023; the scaling book gives 45 GB/s), so
    # 100 GB/s along one torus dimension; DCN as v5p (50 Gb/s per chip, assumed: Google does not list it).
    AcceleratorSpec("TPU v4", ("tpu v4",), 275.0, None, 1.2, hbm_gb=32 * GIB, node_size=4096, node_gbps=100,
                    network_gbps=6.25, sources=("https://cloud.google.com/tpu/docs/v4",
                                                "https://arxiv.org/abs/2304.01433")),
)


def match(device_kind: str) -> AcceleratorSpec | None:
    kind = device_kind.lower()
    # "tpu v5 lite" must not be taken for v5p's "tpu v5": try longer patterns first.
    pairs = sorted(((p, s) for s in SPECS for p in s.kinds), key=lambda ps: -len(ps[0]))
    return next((s for p, s in pairs if p in kind), None)


def _key(name: str) -> str:
    return name.lower().replace("tpu", "").replace(" ", "").replace("-", "").replace("_", "")


def named(name: str) -> AcceleratorSpec:
    """The row a person means by `name`: "h200", "H100", "mi300x", "v5p", "tpu-v5e", "TPU v6e", "trillium"."""
    aliases = {"trillium": "v6e"}
    key = aliases.get(_key(name), _key(name))
    for s in SPECS:
        if _key(s.name) == key:
            return s
    raise KeyError(f"unknown accelerator {name!r}; known: {', '.join(hardware_names())}")


def hardware_names() -> list[str]:
    """The names `named` accepts, one per row: h200, h100, b200, mi300x, v6e, v5p, v5e, v4."""
    return [_key(s.name) for s in SPECS]
