"""What the launchers ask of the GPU a tensor lives on: its compute capability and SM count.
One lookup for every kernel module, which tests/helpers/decode_trace.py answers for an H200
when it records a step on a machine without one. And the compile option every launch passes."""
from __future__ import annotations

import functools

import torch

# The kernels' fp32 arithmetic is written for fused multiply-adds (a dot product times its
# scale added to an accumulator is one FFMA; bench/README.md counts them). Triton 3.9 warns
# that its default turns fusion off from 3.10 on; every launch asks for it instead.
FP_FUSION = dict(enable_fp_fusion=True)


@functools.lru_cache(maxsize=None)
def _properties(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.multi_processor_count


def arch_and_sms(device: torch.device) -> tuple[int | None, int | None]:
    """(compute capability as 80/90/..., SM count) of a CUDA device; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    return _properties(device.index if device.index is not None else torch.cuda.current_device())
