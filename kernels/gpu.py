"""What the launchers ask of the GPU a tensor lives on: its compute capability and SM count.
One lookup for every kernel module, which tests/helpers/decode_trace.py answers for an H200
when it records a step on a machine without one."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _properties(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.multi_processor_count


def arch_and_sms(device: torch.device) -> tuple[int | None, int | None]:
    """(compute capability as 80/90/..., SM count) of a CUDA device; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    return _properties(device.index if device.index is not None else torch.cuda.current_device())
