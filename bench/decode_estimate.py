"""A decode step's time on an H200, estimated from recorded launches and their compiled code.

Per kernel:  time = launch gap + max(bandwidth time, issue time)
- bandwidth time = bytes it moves / (achievable HBM bandwidth x min(1, CTAs / SMs)):
  fewer CTAs than SMs leave SMs without loads in flight.
- issue time = warp-instructions it executes / (4 per cycle x clock x min(CTAs, SMs)):
  warp-instructions = CTAs x warps x (loop trips x loop instructions + the rest of the
  kernel once), from the SASS.
- launch gap: a fixed cost per kernel even inside a CUDA graph.
A torch op (a kernel on a GPU) costs the launch gap plus its bytes (2 x what it writes)
at the bandwidth. The step is the sum: nothing overlaps. All of it is a model; a GPU run
checks it.
"""
from __future__ import annotations

import torch
import triton

H200_SPEC = dict(name="H200 (132 SMs, 1.98 GHz, 4.8 TB/s peak HBM)", sms=132, clock_hz=1.98e9, issue_per_cycle=4,
                 bw_bytes_s=4.25e12, launch_s=1.5e-6)

ASSUMPTIONS = [
    f"{H200_SPEC['sms']} SMs at {H200_SPEC['clock_hz'] / 1e9:.2f} GHz, {H200_SPEC['issue_per_cycle']} "
    "warp-instructions issued per SM per cycle at best (no stalls counted beyond that)",
    f"HBM at {H200_SPEC['bw_bytes_s'] / 1e12:.2f} TB/s achievable (a large copy; 4.8 TB/s is the peak), "
    "scaled by min(1, CTAs/132) for launches with fewer CTAs than SMs",
    f"{H200_SPEC['launch_s'] * 1e6:.1f} us per kernel, added in series (inside a CUDA graph; no overlap of "
    "consecutive kernels)",
    "per kernel the slower of bandwidth and issue, never their sum; latency of a lone DRAM round trip "
    "is taken as covered by the launch gap",
    "matmul bytes: the weight planes the launch reads (GGUF bytes as repacked) + x + y; attention: the live "
    "context's K and V rows; torch ops: twice the bytes they write",
    "issue: loop instructions x trips from the SASS of the sm_90 cubin (static count: predicated-off "
    "instructions are counted as issued)",
]

# Weight-plane arguments and loop trips per CTA of each matmul kernel.
_MATMULS = {
    "_qgemv_kernel": (("q_ptr", "qh_ptr", "s_ptr", "f_ptr"),
                      lambda a: triton.cdiv(triton.cdiv(a["K"], a["SUB"] * a["NSUB"]), a["SPLIT_K"])),
    "_qgemm_kernel": (("q_ptr", "qh_ptr", "s_ptr", "f_ptr"),
                      lambda a: triton.cdiv(triton.cdiv(a["K"], a["BLOCK_K"]), a["SPLIT_K"])),
    "_gate_up_gemv_kernel": (("gq_ptr", "gqh_ptr", "gs_ptr", "gf_ptr", "uq_ptr", "uqh_ptr", "us_ptr", "uf_ptr"),
                             lambda a: triton.cdiv(a["K"], a["BLOCK_K"])),
    "_gate_up_gemm_kernel": (("gq_ptr", "gqh_ptr", "gs_ptr", "gf_ptr", "uq_ptr", "uqh_ptr", "us_ptr", "uf_ptr"),
                             lambda a: triton.cdiv(a["K"], a["BLOCK_K"])),
}
# Arguments whose tensor is a whole pool or table of which a step touches a few rows.
_POOLS = {"k_cache_ptr", "v_cache_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "bt_ptr"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensor_bytes(args: dict, names=None, skip=()) -> int:
    """Bytes of the tensor arguments (each distinct tensor once)."""
    seen, total = set(), 0
    for name, v in args.items():
        if (names is not None and name not in names) or name in skip or not isinstance(v, torch.Tensor):
            continue
        key = (v.data_ptr(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            total += _nbytes(v)
    return total


def _type_names(launch) -> str:
    from smollm3_triton.gguf.constants import type_name
    c = launch.constexprs()
    codes = [c[k] for k in ("QTYPE", "QTYPE_A", "QTYPE_B", "QTYPE_G", "QTYPE_U") if k in c and c[k] is not None]
    return "/".join(dict.fromkeys(type_name(int(t)) for t in codes))


def _pool_bytes(launch, model, context: int) -> int:
    """Bytes of the rows of pools and tables the launch touches."""
    a, c = launch.args, model.config
    item = model.dtype.itemsize
    if launch.name.startswith("_attn_decode_split"):
        B = a["lens_ptr"].shape[0]
        return 2 * B * c.n_kv_heads * context * c.head_dim * item + B * triton.cdiv(context, 16) * 4
    if "k_cache_ptr" in a:          # the RoPE + KV write: one token's rows per slot, cos/sin rows
        T = a["pos_ptr"].shape[0]
        return 2 * T * c.n_kv_heads * c.head_dim * item + 2 * T * c.head_dim // 2 * 4
    return 0


def matmul_role(launch, model) -> str:
    """Which matrix of the model a matmul launch computes, from its (N, K)."""
    a, c = launch.args, model.config
    if "K" not in a or "N" not in a:
        return ""
    K = a["K"]
    if K == c.intermediate_size:
        return "down"
    if K == c.n_heads * c.head_dim and a["N"] == c.hidden_size and "QTYPE_G" not in a:
        return "o"
    n_total = a.get("N_TOTAL", a["N"])
    if "QTYPE_G" in a or n_total in (c.intermediate_size, 2 * c.intermediate_size):
        return "gate_up"
    if n_total >= c.vocab_size or a["N"] > c.qkv_rows:
        return "lm_head"
    return "qkv"


def estimate_launch(launch, stats: dict, model, context: int) -> dict:
    spec = H200_SPEC
    a = launch.args
    ctas = launch.ctas
    planes, trips_of = _MATMULS.get(launch.name, (None, None))
    weight_bytes = _tensor_bytes(a, planes) if planes else 0
    moved = _tensor_bytes(a, skip=_POOLS) + _pool_bytes(launch, model, context)
    loop = stats.get("loop")
    if trips_of and loop:
        trips = trips_of(a)
        per_warp = trips * loop["instructions"] + stats["kernel_instructions"] - loop["instructions"]
        bpi = weight_bytes / (ctas * launch.num_warps * trips * loop["instructions"])
    else:
        per_warp, bpi = stats["kernel_instructions"], None
    warp_instr = ctas * launch.num_warps * per_warp
    bw_s = moved / (spec["bw_bytes_s"] * min(1.0, ctas / spec["sms"]))
    issue_s = warp_instr / (spec["issue_per_cycle"] * spec["clock_hz"] * min(ctas, spec["sms"]))
    return dict(bytes=moved, bw_s=bw_s, issue_s=issue_s, launch_s=spec["launch_s"],
                time_s=spec["launch_s"] + max(bw_s, issue_s), bytes_per_warp_instr=bpi, types=_type_names(launch),
                weight_bytes=weight_bytes)


def estimate_torch_op(out_bytes: int) -> dict:
    spec = H200_SPEC
    moved = 2 * out_bytes
    bw_s = moved / spec["bw_bytes_s"]
    return dict(bytes=moved, bw_s=bw_s, issue_s=0.0, launch_s=spec["launch_s"], time_s=spec["launch_s"] + bw_s)
