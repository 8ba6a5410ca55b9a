"""A decode step's time on an H200, estimated from recorded launches and their compiled code.

Per kernel:  time = launch gap + max(bandwidth time, issue time)
- bandwidth time = bytes it moves / (achievable HBM bandwidth x min(1, CTAs / SMs)):
  fewer CTAs than SMs leave SMs without loads in flight.
- issue time = the busiest SM's warp-instructions / (4 per cycle x clock): it runs
  ceil(CTAs / SMs) CTAs, each warps x (loop trips x loop instructions + the rest of the
  kernel once) from the SASS, with the trips of the longest CTA.
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
    "consecutive kernels), also for the Triton kernels launched with programmatic dependent launch "
    "(kernels/pdl.py): what that saves is for a GPU run to measure",
    "per kernel the slower of bandwidth and issue, never their sum; latency of a lone DRAM round trip "
    "is taken as covered by the launch gap",
    "matmul bytes: the weight tiles the launch reads + x + the split-K partials (written and read) + the "
    "output; attention: the live context's K and V rows and the live splits' partials; the embedding: its rows; "
    "torch ops: twice the bytes they write",
    "issue: loop instructions x trips from the SASS of the sm_90 cubin (static count: predicated-off "
    "instructions are counted as issued; a program's code outside its tile loops counted once per program; "
    "a two-part weight's program runs its own part's loop); attention: only the splits the live context wakes",
    "issue is the busiest SM's: ceil(CTAs / 132) CTAs of the longest kind (a decode matmul's programs "
    "looping over the most units), as if all CTAs started together (wave quantization)",
    "a split-K matmul's finishing epilogue (the SASS its counter atomic's branch skips) counted once per "
    "unit, for the one program that finishes it, each loop inside it as S iterations (an upper bound: the "
    "slice loop is unrolled, the inverse-RMS loop runs once per launch); spread evenly over the SMs like "
    "the rest",
]

def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _distinct_bytes(tensors) -> int:
    """Bytes of the tensors, each distinct tensor (storage pointer and shape) once."""
    seen = {(t.data_ptr(), tuple(t.shape)): _nbytes(t) for t in tensors if isinstance(t, torch.Tensor)}
    return sum(seen.values())


def _type_names(launch) -> str:
    from smollm3_triton.gguf.constants import type_name
    c = launch.constexprs()
    codes = [c[k] for k in ("QTYPE", "QTYPE_A", "QTYPE_B") if k in c and c[k] is not None]
    return "/".join(dict.fromkeys(type_name(int(t)) for t in codes))


def _matmul(launch) -> tuple[int, int, float, float]:
    """(weight bytes, other bytes moved, loop trips per CTA on average, loop trips of the longest CTA)
    of a matmul launch (kernels/qmatmul.py)."""
    a = launch.args
    A, B = a["A"], a["B"]
    rows_a, rows_b = A[10], B[10]
    weights = _distinct_bytes(A[:5] + (B[:5] if rows_b else ()))
    x = a["x_ptr"]
    M, K, N = a["M"], a["K"], rows_a + rows_b
    item = x.element_size()
    part = a["part_ptr"]
    other = M * K * item + 2 * _nbytes(part) + 2 * M * N * item     # x; partials written and read; out (+ h in)
    c = launch.constexprs()
    groups_k = triton.cdiv(K, 64)
    if launch.name == "_qmv_kernel":
        tiles = 1 if c["EPILOGUE"] == 1 else c["UNIT_TILES"]
        if c["GROUPS"] == c["SUB"]:
            # the loop over units, the slice's x loaded once: units / programs per slice on average
            trips = tiles * a["units"] / triton.cdiv(a["units"], a["units_per_program"])
            return weights, other, trips, tiles * min(a["units"], a["units_per_program"])
        else:
            # the loop over the slice's x chunks (one unit per program, all its tiles in each
            # iteration), averaged over the slices
            trips = groups_k / (triton.cdiv(groups_k, c["GROUPS"]) * c["SUB"])
    else:
        trips = triton.cdiv(groups_k, c["GROUPS"] if c["GROUPS"] == c["SUB"] else c["SUB"])
    return weights, other, trips, trips


def _attention(launch, model, context: int) -> tuple[int, int, int]:
    """(bytes, live CTAs, key-loop trips per live CTA) of a decode attention launch."""
    a, c = launch.args, model.config
    B = a["lens_ptr"].shape[0]
    item = model.dtype.itemsize
    block_n = launch.args["BLOCK_N"]
    chunk = max(triton.cdiv(triton.cdiv(context, a["want_splits"]), block_n), a["MIN_BLOCKS"]) * block_n
    live = triton.cdiv(context, chunk)
    kv = 2 * B * c.n_kv_heads * context * c.head_dim * item + B * triton.cdiv(context, 16) * 4
    partials = 2 * B * c.n_heads * live * (c.head_dim + 1) * 4
    return kv + partials + 2 * B * c.n_heads * c.head_dim * item, B * c.n_kv_heads * live, chunk // block_n


def matmul_role(launch, model) -> str:
    """Which matrix of the model a matmul launch computes, from its shape and epilogue."""
    if launch.name not in ("_qmv_kernel", "_qmm_kernel"):
        return ""
    a, c = launch.args, model.config
    epilogue = launch.constexprs()["EPILOGUE"]
    if epilogue == 3:
        return "qkv"
    if epilogue == 1:
        return "gate_up"
    if epilogue == 2:
        return "down" if a["K"] == c.intermediate_size else "o"
    return "lm_head"


def estimate_launch(launch, stats: dict, model, context: int) -> dict:
    spec = H200_SPEC
    ctas = launch.ctas
    weight_bytes, bpi, trips = 0, None, 1
    loop = stats.get("loop")
    if launch.name in ("_qmv_kernel", "_qmm_kernel"):
        weight_bytes, other, trips, most_trips = _matmul(launch)
        moved = weight_bytes + other
    elif launch.name == "_attn_decode_kernel":
        moved, ctas, trips = _attention(launch, model, context)
    elif launch.name == "_embedding_kernel":
        embed = model.weights.embed
        T = launch.args["T"]
        moved = T * (embed.nbytes // embed.shape[0]) + 2 * T * embed.shape[1] * model.dtype.itemsize
    else:
        moved = _distinct_bytes(v for v in launch.args.values())
    if loop:
        # The program's own code: the kernel less the loops counted with their trips (less the
        # loop's size where this compile unrolled its single trip).
        rest = stats["kernel_instructions"] - (stats.get("tile_loops_here") or loop["instructions"])
        per_trip = longest_trip = loop["instructions"]
        parts = stats.get("part_loops") or []
        if len(parts) == 2:
            # A two-part weight: a program runs its own part's loop; tiles weigh the average.
            tiles = [triton.cdiv(launch.args[p][10], 64) for p in ("A", "B")]
            per_trip = (tiles[0] * parts[0] + tiles[1] * parts[1]) / sum(tiles)
            longest_trip = max(parts)
        per_warp = trips * per_trip + rest
        longest = (most_trips if weight_bytes else trips) * longest_trip + rest
        if weight_bytes:
            bpi = weight_bytes / (ctas * launch.num_warps * trips * loop["instructions"])
    else:
        per_warp = longest = stats["kernel_instructions"]
        if weight_bytes:
            bpi = weight_bytes / (ctas * launch.num_warps * per_warp)
    busiest = triton.cdiv(ctas, spec["sms"]) * launch.num_warps * longest
    if stats.get("finish"):
        # The finishing epilogue runs once per unit (in the last of its S slices' programs),
        # not in every program; each loop inside it counted as S iterations (an upper bound),
        # spread over the SMs.
        finish, in_loops = stats["finish"]
        slices = launch.grid[0]
        busiest += launch.num_warps * ((launch.args["units"] * (finish + in_loops * (slices - 1)) - ctas * finish)
                                       / min(ctas, spec["sms"]))
    bw_s = moved / (spec["bw_bytes_s"] * min(1.0, ctas / spec["sms"]))
    issue_s = busiest / (spec["issue_per_cycle"] * spec["clock_hz"])
    return dict(bytes=moved, bw_s=bw_s, issue_s=issue_s, launch_s=spec["launch_s"],
                time_s=spec["launch_s"] + max(bw_s, issue_s), bytes_per_warp_instr=bpi, types=_type_names(launch),
                weight_bytes=weight_bytes, live_ctas=ctas)


def estimate_torch_op(out_bytes: int) -> dict:
    spec = H200_SPEC
    moved = 2 * out_bytes
    bw_s = moved / spec["bw_bytes_s"]
    return dict(bytes=moved, bw_s=bw_s, issue_s=0.0, launch_s=spec["launch_s"], time_s=spec["launch_s"] + bw_s)
