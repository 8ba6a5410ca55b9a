"""The model's compute ops, each a Triton kernel beside its plain-torch reference.

`load_ops(backend)` returns the set the model calls: "torch" gives the
references (the exact fp32 path), "triton" the kernels (on CPU they run under
TRITON_INTERPRET=1), "cpu" the fast CPU path (kernels/cpu_fast.py: int4 weights).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

# @triton.jit builds a compiled or an interpreted kernel when it decorates, so the choice
# is made here, before any kernel module is imported: without a GPU only the interpreter
# can run them. An explicit TRITON_INTERPRET (e.g. 0 to cross-compile for a GPU) wins.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from .attention import attention_torch
from .qmatmul import qmatmul_torch
from .rms_norm import rms_norm_torch
from .rope_qkv import rope_qkv_torch
from .swiglu import gate_up_swiglu_torch

BACKENDS = ("cpu", "torch", "triton")


@dataclass(frozen=True)
class Ops:
    qmatmul: Callable
    gate_up_swiglu: Callable
    rope_qkv: Callable
    attention: Callable
    rms_norm: Callable


TORCH_OPS = Ops(qmatmul=qmatmul_torch, gate_up_swiglu=gate_up_swiglu_torch, rope_qkv=rope_qkv_torch,
                attention=attention_torch, rms_norm=rms_norm_torch)


def load_ops(backend: str) -> Ops:
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        from .triton_ops import TRITON_OPS
        return TRITON_OPS
    if backend == "cpu":
        from .cpu_fast import CPU_OPS
        return CPU_OPS
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
