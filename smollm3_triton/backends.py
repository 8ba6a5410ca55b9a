"""Backends: which ops the model calls, how its weights are prepared once at load, and
whether decode steps replay from CUDA graphs.

- "torch": the plain-torch references of every kernel (the exact fp32 path and the
  tests' oracle); on the CPU every matrix is dequantized once at load.
- "triton": the Triton kernels (weights repacked into the kernels' tile layout; CUDA graphs
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
from .kernels.attention_reference import attention_torch
from .kernels.qmatmul import qmatmul_torch
from .kernels.rms_norm import rms_norm_torch
from .kernels.rope_qkv import rope_qkv_torch
from .kernels.swiglu import gate_up_swiglu_torch
from .weights import TORCH_TO_GGML, ModelWeights

BACKENDS = ("cpu", "torch", "triton")


@dataclass(frozen=True)
class Ops:
    """The model's compute steps; each backend fills them with its kernels. `stats` is what a
    norm needs of the residual stream h beyond h itself: the Triton path's per-row inv_rms
    (written by the op that produced h), None where each norm computes its own."""
    embed: Callable                # (token_ids, embed, dtype, eps) -> (h, stats)
    row_stats: Callable            # (h, eps) -> stats, after rows of h were replaced (image rows)
    norm_rope_qkv: Callable        # (h, stats, norm_w, eps, w_qkv, positions, cos, sin, k_cache, v_cache,
                                   #  slot_mapping, n_heads, n_kv_heads, head_dim, use_rope) -> q
    attention: Callable            # (q, k_cache, v_cache, query_start, seq_lens, block_tables, max_query_len, scale)
    add_matmul: Callable           # (x, w, h, eps) -> (h + x @ w.T, stats); h may be updated in place
    norm_gate_up_swiglu: Callable  # (h, stats, norm_w, eps, w_gate_up) -> silu(gate) * up
    norm_logits: Callable          # (h, stats, norm_w, eps, w_lm_head) -> fp32 logits


def composed_ops(qmatmul: Callable, gate_up_swiglu: Callable, rope_qkv: Callable, attention: Callable,
                 rms_norm: Callable = rms_norm_torch, add_matmul: Callable | None = None) -> Ops:
    """The op table of per-step kernels: every norm computed on its own (`rms_norm`, with
    rms_norm_torch's contract), the residual add in torch unless `add_matmul` (Ops' contract)
    does it; no stats."""
    def normed(h, norm_w, eps):
        return rms_norm(h, norm_w, eps)[0]

    if add_matmul is None:
        def add_matmul(x, w, h, eps):
            return h + qmatmul(x, w), None

    return Ops(embed=lambda ids, embed, dtype, eps: (embed.dequantize_rows(ids, dtype), None),
               row_stats=lambda h, eps: None,
               norm_rope_qkv=lambda h, stats, norm_w, eps, w, *rest: rope_qkv(normed(h, norm_w, eps), w, *rest),
               attention=attention,
               add_matmul=add_matmul,
               norm_gate_up_swiglu=lambda h, stats, norm_w, eps, w: gate_up_swiglu(normed(h, norm_w, eps), w),
               norm_logits=lambda h, stats, norm_w, eps, w: qmatmul(normed(h, norm_w, eps), w).float())


TORCH_OPS = composed_ops(qmatmul_torch, gate_up_swiglu_torch, rope_qkv_torch, attention_torch)


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
            ops = composed_ops(cpu_native.qmatmul, cpu_native.gate_up_swiglu, cpu_native.rope_qkv,
                               cpu_native.attention, rms_norm=cpu_native.rms_norm, add_matmul=cpu_native.add_matmul)
            # An fp16 cache, as llama.cpp's default: half the bytes a long context's decode
            # reads, 2^-11 relative rounding of K and V (fp32 attention math).
            return Backend(name, ops, cpu_native.prepare, cuda_graphs=False, step_runner=_cpu_step_runner,
                           kv_dtype=torch.float16)
        from .kernels.cpu_fast import attention_cpu, gate_up_swiglu_cpu, prepare, qmatmul_cpu, rope_qkv_cpu
        return Backend(name, composed_ops(qmatmul_cpu, gate_up_swiglu_cpu, rope_qkv_cpu, attention_cpu), prepare,
                       cuda_graphs=False)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RequestError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before smollm3_triton is "
                           "imported (it is set automatically without CUDA)", param="backend")
    return triton_backend(cuda_graphs=device.type == "cuda")


def triton_backend(*, cuda_graphs: bool) -> Backend:
    """The Triton backend without the device checks of get_backend (bench/static_report.py
    builds one on a machine without a GPU to record what it would launch)."""
    return Backend("triton", triton_ops(), _repack(), cuda_graphs=cuda_graphs)


def _cpu_step_runner(model, forward: Callable) -> Callable:
    from .kernels import cpu_step
    return cpu_step.DecodeStepRunner(model, forward) if cpu_step.supported(model) else forward


def triton_ops() -> Ops:
    """The fused Triton op table: five launches per layer (kernels/fusions.py)."""
    from .kernels.attention import attention_triton
    from .kernels.embedding import embedding_triton
    from .kernels.qmatmul import add_qmatmul_triton, qmatmul_triton
    from .kernels.rms_norm import rms_stats_triton
    from .kernels.rope_qkv import rope_qkv_triton
    from .kernels.swiglu import gate_up_swiglu_triton
    return Ops(embed=embedding_triton, row_stats=rms_stats_triton,
               norm_rope_qkv=lambda h, stats, norm_w, eps, w, *rest: rope_qkv_triton(h, w, *rest, norm=(stats, norm_w)),
               attention=attention_triton, add_matmul=add_qmatmul_triton,
               norm_gate_up_swiglu=lambda h, stats, norm_w, eps, w: gate_up_swiglu_triton(h, w, norm=(stats, norm_w)),
               norm_logits=lambda h, stats, norm_w, eps, w: qmatmul_triton(h, w, out_dtype=torch.float32,
                                                                            norm=(stats, norm_w)))


def _repack() -> Callable:
    """Repack every matrix into the Triton kernels' tile layout; the tiled embedding still
    serves row lookups."""
    from .kernels.qtiles import prepare_tiles
    return prepare_tiles
