"""What one forward step launches, recorded on a machine without a GPU.

`trace(fn)` runs `fn()` with every Triton launch intercepted (recorded, not run) and
every torch op counted that would be a kernel on a GPU. The launchers still run on CPU
tensors (shapes, strides, grids, split counts are what a GPU would see), only the
kernels do not execute, so outputs hold garbage. It works with compiled kernels
(TRITON_INTERPRET=0 when smollm3_triton is first imported; what bench/static_report.py
needs to compile the launches) and with interpreted ones (a test counting launches).

`model_like(shape, quant)` builds a Transformer with the exact matrix shapes and
per-tensor GGUF types of a real file (tests/helpers/synthetic.py's recipe) whose
layers share two sets of weights (the Q6_K-`use_more_bits` layers and the rest), so
a 36-layer SmolLM3-3B fits in memory. `decode_batch` is the batch of a pure decode
step of B sequences at a given context length, as the CUDA-graph runner feeds it.

The launchers size some grids from the GPU (SM count, compute capability); `trace`
takes a `device_profile` and patches those lookups so the grids are an H200's.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch nothing on a GPU: views, allocation, metadata.
_NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "expand", "permute", "transpose",
    "t", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk",
    "unbind", "narrow", "diagonal", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
    "lift_fresh", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "is_same_size", "unfold",
    "view_as", "expand_as", "movedim", "_unsafe_view_copy",
}
# Ops that read a device value on the host: a sync (and a CUDA graph cannot hold them).
_HOST_READS = {"_local_scalar_dense", "item", "tolist", "nonzero", "equal"}


@dataclass
class Launch:
    """One Triton launch: the kernel, its grid, bound arguments and options."""
    fn: object
    grid: tuple[int, int, int]
    args: dict
    num_warps: int
    num_stages: int
    launch_pdl: bool = False
    enable_fp_fusion: bool | None = None     # None: triton's default

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def constexprs(self) -> dict:
        return {p.name: self.args[p.name] for p in self.fn.params if p.is_constexpr}


@dataclass
class Trace:
    launches: list[Launch] = field(default_factory=list)
    torch_ops: list[str] = field(default_factory=list)
    torch_out_bytes: list[int] = field(default_factory=list)    # bytes each torch op writes
    host_reads: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> int:
        """Kernels a GPU would run: Triton launches plus torch ops that launch one."""
        return len(self.launches) + len(self.torch_ops)


class _CountOps(TorchDispatchMode):
    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in _HOST_READS:
            self.trace.host_reads.append(name)
        elif name not in _NO_KERNEL and not (name in ("_to_copy", "to") and _same_as_input(args, kwargs)):
            self.trace.torch_ops.append(name)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.trace.torch_out_bytes.append(sum(o.numel() * o.element_size() for o in outs
                                                  if isinstance(o, torch.Tensor)))
        return out


def _same_as_input(args, kwargs) -> bool:
    kwargs = kwargs or {}
    x = args[0]
    return kwargs.get("dtype", x.dtype) == x.dtype and kwargs.get("device", x.device) == x.device


def _grid(grid, bound: dict) -> tuple[int, int, int]:
    g = grid(bound) if callable(grid) else grid
    g = tuple(int(v) for v in g)
    return g + (1,) * (3 - len(g))


@dataclass(frozen=True)
class DeviceProfile:
    """What the launchers ask the GPU: its SM count and compute capability."""
    name: str
    sm_count: int
    arch: int


H200 = DeviceProfile("H200", 132, 90)


@contextlib.contextmanager
def _device_profile(profile: DeviceProfile):
    from smollm3_triton.kernels import attention, qmatmul
    patches = []
    try:
        from smollm3_triton.kernels import gpu
        patches.append((gpu, "arch_and_sms", lambda device: (profile.arch, profile.sm_count)))
    except ImportError:                     # kernels before their shared lookup (exports of older commits)
        patches.append((attention, "_arch_and_sms", lambda device: (profile.arch, profile.sm_count)))
        patches.append((qmatmul, "_sm_count" if hasattr(qmatmul, "_sm_count") else "sm_count",
                        lambda device: profile.sm_count))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, fn in patches:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def trace(fn, profile: DeviceProfile = H200) -> Trace:
    """Run fn() with Triton launches recorded instead of run, and torch kernels counted."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernel_class = InterpretedFunction if triton.knobs.runtime.interpret else JITFunction
    out = Trace()
    real_run = kernel_class.run

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl", "enable_fp_fusion")
                   if k in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        params = dict(bound.arguments)
        out.launches.append(Launch(self, _grid(grid, params), params, options.get("num_warps", 4),
                                   options.get("num_stages", 3), options.get("launch_pdl", False),
                                   options.get("enable_fp_fusion")))

    if getattr(real_run, "__name__", "") == "record":
        raise RuntimeError("trace() does not nest")
    kernel_class.run = record
    try:
        with _device_profile(profile), _CountOps(out):
            fn()
    finally:
        kernel_class.run = real_run
    return out


# ----------------------------------------------------------------------------- a model of a real file's shape

def model_like(shape_name: str, quant: str, *, scale: int = 1, n_blocks: int = 8, block_size: int = 16,
               dtype: torch.dtype = torch.bfloat16, backend=None):
    """A Transformer with the matrix shapes and GGUF types of `shape_name` (synthetic.SHAPES,
    widths divided by `scale` as ModelShape.scaled does) quantized as `quant`, weights
    prepared by `backend` (default: triton's preparation).
    Layers with the same types share one set of (random) weights."""
    import numpy as np

    from smollm3_triton.config import ModelConfig
    from smollm3_triton.gguf.constants import GGMLType
    from smollm3_triton.gguf.tensors import QuantTensor, concat_rows
    from smollm3_triton.model import Transformer
    from smollm3_triton.weights import LayerWeights, ModelWeights
    from tests.helpers import synthetic

    s = synthetic.SHAPES[shape_name].scaled(scale)
    rng = np.random.default_rng(0)
    shapes = dict(s.matrices())

    def matrix(name: str) -> QuantTensor:
        rows, cols = shapes[name]
        t = synthetic.tensor_type(name, cols, quant, s)
        data = torch.from_numpy(synthetic.random_matrix(rng, t, rows, cols))
        return QuantTensor(data, GGMLType(int(t)), (rows, cols))

    def ones(n):
        return torch.ones(n, dtype=torch.float32)

    layer_sets: dict[tuple, LayerWeights] = {}
    layers = []
    for i in range(s.n_layers):
        names = {r: f"blk.{i}.{r}.weight" for r in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                    "ffn_up", "ffn_down")}
        key = tuple(synthetic.tensor_type(n, shapes[n][1], quant, s) for n in names.values())
        if key not in layer_sets:
            layer_sets[key] = LayerWeights(
                attn_norm=ones(s.hidden),
                qkv=concat_rows([matrix(names["attn_q"]), matrix(names["attn_k"]), matrix(names["attn_v"])]),
                o=matrix(names["attn_output"]), ffn_norm=ones(s.hidden),
                gate_up=concat_rows([matrix(names["ffn_gate"]), matrix(names["ffn_up"])]),
                down=matrix(names["ffn_down"]))
        layers.append(layer_sets[key])
    embed = matrix("token_embd.weight")
    weights = ModelWeights(embed=embed, layers=layers, norm=ones(s.hidden),
                           lm_head=embed if s.tied else matrix("output.weight"))
    nope = 4 if s.arch == "smollm3" else 0
    config = ModelConfig(arch=s.arch, vocab_size=s.vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
                         rms_norm_eps=s.rms_eps, rope_theta=s.rope_theta, max_position_embeddings=s.context_length,
                         use_rope=tuple(not nope or (i + 1) % nope != 0 for i in range(s.n_layers)),
                         tie_word_embeddings=s.tied)
    if backend is None:
        from smollm3_triton.backends import triton_backend
        backend = triton_backend(cuda_graphs=False)
    weights = _prepare_shared(backend, weights)
    model = Transformer(config, weights, backend.ops, max_seq_len=min(s.context_length, 8192), dtype=dtype,
                        device=torch.device("cpu"))
    model.allocate_cache(n_blocks, block_size)
    return model


def _prepare_shared(backend, weights):
    """backend.prepare_weights, preparing each shared layer object once."""
    from smollm3_triton.weights import LayerWeights, ModelWeights
    done: dict[int, LayerWeights] = {}
    layers = []
    for layer in weights.layers:
        if id(layer) not in done:
            one = backend.prepare_weights(ModelWeights(embed=weights.embed, layers=[layer], norm=weights.norm,
                                                       lm_head=weights.embed))
            done[id(layer)] = one.layers[0]
        layers.append(done[id(layer)])
    head = backend.prepare_weights(ModelWeights(embed=weights.embed, layers=[], norm=weights.norm,
                                                lm_head=weights.lm_head))
    return ModelWeights(embed=head.embed, layers=layers, norm=head.norm, lm_head=head.lm_head)


def decode_batch(model, n_seqs: int, context: int):
    """A pure decode step: n_seqs sequences, each at `context` tokens after the step, one
    new token each. Block tables are as wide as the context needs and point at block 0
    (the kernels do not run; widths and lengths are what sizes their grids)."""
    from smollm3_triton.model import Batch
    bs = model.cache.block_size
    width = -(-context // bs)
    return Batch(token_ids=torch.zeros(n_seqs, dtype=torch.int64),
                 positions=torch.full((n_seqs,), context - 1, dtype=torch.int64),
                 slot_mapping=torch.zeros(n_seqs, dtype=torch.int64),
                 query_start=torch.arange(n_seqs + 1, dtype=torch.int32),
                 seq_lens=torch.full((n_seqs,), context, dtype=torch.int32),
                 block_tables=torch.zeros(n_seqs, width, dtype=torch.int32),
                 max_query_len=1, logits_rows=torch.arange(n_seqs))
