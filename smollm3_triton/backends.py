"""Backends: which ops the model calls, how its weights are prepared once at load, and
whether decode steps replay from CUDA graphs.

- "torch": the plain-torch references of every kernel (the exact fp32 path and the
  tests' oracle); on the CPU every matrix is dequantized once at load.
- "triton": the Triton kernels (weights repacked into the kernels' planes; CUDA graphs
  on a GPU). Without a GPU they run under TRITON_INTERPRET=1, for tests.
- "cpu": the fast CPU path: the compiled kernels (kernels/cpu_native.py, csrc/cpu/) for a
  float32 model where they were built, else torch's ops on 4-bit weights (kernels/cpu_fast.py).

`Runtime.load` picks one with `get_backend(name, device)`; the model only sees `ops`.
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

from .errors import RequestError
from .gguf.tensors import QuantTensor
from .kernels.attention import attention_torch
from .kernels.qmatmul import qmatmul_torch
from .kernels.rms_norm import rms_norm_torch
from .kernels.rope_qkv import rope_qkv_torch
from .kernels.swiglu import gate_up_swiglu_torch
from .weights import TORCH_TO_GGML, ModelWeights

BACKENDS = ("cpu", "torch", "triton")


@dataclass(frozen=True)
class Ops:
    """The model's compute steps; each backend fills them with its kernels."""
    qmatmul: Callable
    gate_up_swiglu: Callable
    rope_qkv: Callable
    attention: Callable
    rms_norm: Callable


TORCH_OPS = Ops(qmatmul=qmatmul_torch, gate_up_swiglu=gate_up_swiglu_torch, rope_qkv=rope_qkv_torch,
                attention=attention_torch, rms_norm=rms_norm_torch)


@dataclass(frozen=True)
class Backend:
    name: str
    ops: Ops
    prepare_matrix: Callable          # one weight matrix -> what the ops take, once at load
    cuda_graphs: bool                 # decode steps replayed from CUDA graphs
    # (model, forward) -> the engine's runner in forward's place (the cpu backend's decode
    # steps in one compiled call); None: forward itself
    step_runner: Callable | None = None
    kv_dtype: torch.dtype | None = None  # the KV cache's dtype; None: the model's compute dtype

    def prepare_weights(self, weights: ModelWeights) -> ModelWeights:
        """Every matrix prepared for the ops. A tied LM head stays one object with the
        embedding, so it is stored once."""
        return weights.map(self.prepare_matrix, lambda v: v)


def _dequantized(dtype: torch.dtype) -> Callable:
    """The CPU torch path's trade of memory for speed: dequantizing per token costs several
    times the matmul on a CPU, so every matrix is dequantized once into `dtype`."""
    return lambda w: QuantTensor(w.dequantize(dtype).contiguous(), TORCH_TO_GGML[dtype], w.shape)


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend `name` on `device`; refused with RequestError where it cannot run."""
    if name not in BACKENDS:
        raise RequestError(f"backend must be one of {BACKENDS}, got {name!r}", param="backend")
    if name == "torch":
        prepare = _dequantized(dtype) if device.type == "cpu" else (lambda w: w)
        return Backend(name, TORCH_OPS, prepare, cuda_graphs=False)
    if name == "cpu":
        if device.type != "cpu":
            raise RequestError(f"backend='cpu' runs on the CPU only, not on {device}", param="backend")
        from .kernels import cpu_native
        if cpu_native.AVAILABLE and dtype == torch.float32:
            ops = Ops(qmatmul=cpu_native.qmatmul, gate_up_swiglu=cpu_native.gate_up_swiglu,
                      rope_qkv=cpu_native.rope_qkv, attention=cpu_native.attention, rms_norm=cpu_native.rms_norm)
            # An fp16 cache, as llama.cpp's default: half the bytes a long context's decode
            # reads, 2^-11 relative rounding of K and V (fp32 attention math).
            return Backend(name, ops, cpu_native.prepare, cuda_graphs=False, step_runner=_cpu_step_runner,
                           kv_dtype=torch.float16)
        from .kernels.cpu_fast import attention_cpu, gate_up_swiglu_cpu, prepare, qmatmul_cpu, rope_qkv_cpu
        ops = Ops(qmatmul=qmatmul_cpu, gate_up_swiglu=gate_up_swiglu_cpu, rope_qkv=rope_qkv_cpu,
                  attention=attention_cpu, rms_norm=rms_norm_torch)
        return Backend(name, ops, prepare, cuda_graphs=False)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RequestError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before smollm3_triton is "
                           "imported (it is set automatically without CUDA)", param="backend")
    return Backend(name, triton_ops(), _repack(), cuda_graphs=device.type == "cuda")


def _cpu_step_runner(model, forward: Callable) -> Callable:
    from .kernels import cpu_step
    return cpu_step.DecodeStepRunner(model, forward) if cpu_step.supported(model) else forward


def triton_ops() -> Ops:
    from .kernels.attention import attention_triton
    from .kernels.qmatmul import qmatmul_triton
    from .kernels.rms_norm import rms_norm_triton
    from .kernels.rope_qkv import rope_qkv_triton
    from .kernels.swiglu import gate_up_swiglu_triton
    return Ops(qmatmul=qmatmul_triton, gate_up_swiglu=gate_up_swiglu_triton, rope_qkv=rope_qkv_triton,
               attention=attention_triton, rms_norm=rms_norm_triton)


def _repack() -> Callable:
    """Repack every matrix into the Triton kernels' planes; the packed embedding still
    serves row lookups."""
    from .kernels.repack import prepare_weight
    return prepare_weight
