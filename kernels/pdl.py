"""Programmatic dependent launch (PDL; sm_90 up to, not including, sm_120) for a decode step's kernels.

A decode step is ~185 short kernels in a CUDA graph; between two of them the GPU drains
one grid and ramps the next. Launched with PDL, a kernel may be scheduled while the one
before it still runs: it executes `griddepcontrol.wait` before its first global memory
access (that waits for the previous grid to complete and its writes to be visible), and a
kernel signals `griddepcontrol.launch_dependents` once its main loop is done, so the next
one's launch overlaps its tail. A kernel launched without PDL (torch's, the prefill
kernels, the sampler) keeps the ordinary full order after any of them.

The rule every PDL-launched kernel keeps: `wait_for_inputs(PDL)` is its first statement.
`SMOLLM3_PDL=0` launches them the ordinary way (an A/B on a GPU; the default is on where
the GPU has it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import gpu

PDL_ARCH = 90      # griddepcontrol exists from sm_90 on
# Consumer Blackwell (sm_120) has been reported to fail CUDA-graph capture of launches with
# the PDL attribute (sglang PR 18596); Hopper and data-center Blackwell capture them.
PDL_ARCH_END = 120


def launch_options(device: torch.device) -> dict:
    """The PDL constexpr and launch option for a decode kernel on `device`."""
    arch = gpu.arch_and_sms(device)[0]
    if arch is None or not PDL_ARCH <= arch < PDL_ARCH_END or os.environ.get("SMOLLM3_PDL", "1") == "0":
        return dict(PDL=False)
    return dict(PDL=True, launch_pdl=True)


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Blocks until the previous kernel has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def release_next(PDL: tl.constexpr):
    """Lets the next kernel be scheduled (it still waits for this one to complete)."""
    if PDL:
        gdc_launch_dependents()
