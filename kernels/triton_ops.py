"""The Triton op set, and the one-time weight preparation it wants at load."""
from __future__ import annotations

from smollm3_triton.weights import ModelWeights

from . import Ops
from .attention import attention_triton
from .qmatmul import qmatmul_triton
from .repack import prepare_weight
from .rms_norm import rms_norm_triton
from .rope_qkv import rope_qkv_triton
from .swiglu import gate_up_swiglu_triton

TRITON_OPS = Ops(qmatmul=qmatmul_triton, gate_up_swiglu=gate_up_swiglu_triton, rope_qkv=rope_qkv_triton,
                 attention=attention_triton, rms_norm=rms_norm_triton)


def prepare_weights(w: ModelWeights) -> ModelWeights:
    """Repack every matrix into the kernels' planes, once at load. The packed embedding
    still serves row lookups, so a tied LM head is stored once."""
    return w.map(prepare_weight, lambda v: v)
