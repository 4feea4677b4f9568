"""Measuring the sampler: host transfers per call, FLOPs of the UNet, and the device's peak for a fraction.

Used by ``runners.bench`` and by the tests that keep the sampling loop free of per-step host transfers.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 only: V100 has no bf16 tensor cores
)

# Tensor methods that copy to the host (and on a GPU wait for every queued kernel first).
HOST_TRANSFERS = ("cpu", "item", "numpy", "tolist")


def peak_tflops(device_name: str) -> float | None:
    """The table's dense fp16/bf16 peak for a device name, or None when the device is not in the table."""
    for part, peak in PEAK_TFLOPS:
        if part.lower() in device_name.lower():
            return peak
    return None


@contextmanager
def count_host_transfers() -> Iterator[Counter]:
    """Count calls of ``Tensor.cpu/.item/.numpy/.tolist`` and ``Tensor.to("cpu")`` while the block runs, by method
    name. A spy, not a profiler: it sees Python-level calls (how this library moves data), on any device; on a CPU
    run it counts the transfers a GPU run would make. Copies done inside C++ kernels are not seen."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in (*HOST_TRANSFERS, "to")}

    def spy(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            if name != "to" or _to_host(args, kwargs):
                counts[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name in originals:
            setattr(torch.Tensor, name, spy(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _to_host(args, kwargs) -> bool:
    # only an explicit "cpu" string counts: x.to(model.device) is a host move on a CPU run but not on a GPU one
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and target.split(":")[0] == "cpu"


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (matmuls and convolutions; a
    multiply-add is 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
