"""attention_triton (prefill FlashAttention-2 and split-KV decode) against attention_torch.

Without CUDA the kernels run under TRITON_INTERPRET=1 (smollm3_triton.kernels sets it
before any kernel is decorated). bf16 follows the flash-attention rule: against an fp32
reference on the same bf16 inputs, the kernel's error is at most twice that of plain
torch attention computed in bf16.
"""
import pytest
import torch

from smollm3_triton.errors import KernelInputError, UnsupportedModelError
from smollm3_triton.kernels.attention import _decode_max_rows, attention_torch, attention_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (n_heads, n_kv_heads, head_dim): SmolLM3-3B, SmolLM2-135M, SmolLM2-360M, plain MHA.
HEADS = [(16, 4, 128), (9, 3, 64), (15, 5, 64), (8, 8, 128)]
HEAD_IDS = [f"{h}-{kv}-d{d}" for h, kv, d in HEADS]
DTYPES = [torch.float32, torch.bfloat16]
# fp32: both sides sum the same fp32 products in different orders (and the kernel's
# softmax is exp2 of prescaled scores); observed worst ~2e-6 at these sizes.
FP32_ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_to_nearest")


def make_qkv(n_heads, n_kv, head_dim, T, max_seq, dtype, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(T, n_heads, head_dim, generator=g) * q_scale).to(dtype).to(DEVICE)
    k = torch.randn(n_kv, max_seq, head_dim, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(n_kv, max_seq, head_dim, generator=g).to(dtype).to(DEVICE)
    return q, k, v


def plain_bf16_attention(q, k_cache, v_cache, positions, scale):
    """Attention as eager torch runs it in bf16 (the flash-attention test's baseline):
    bf16 matmuls, fp32 softmax rounded to bf16."""
    T, H, D = q.shape
    n_kv = k_cache.shape[0]
    L = int(positions.max()) + 1
    k = k_cache[:, :L].repeat_interleave(H // n_kv, dim=0)
    v = v_cache[:, :L].repeat_interleave(H // n_kv, dim=0)
    scores = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) * scale            # [H, T, L] bf16
    visible = torch.arange(L, device=q.device)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    p = scores.float().softmax(-1).to(q.dtype)
    return torch.matmul(p, v).transpose(0, 1)


def check(q, k, v, positions, label):
    D = q.shape[-1]
    scale = D ** -0.5
    out = attention_triton(q, k, v, positions, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    if q.dtype == torch.float32:
        ref = attention_torch(q, k, v, positions, scale)
        err = (out - ref).abs().max().item()
        print(f"{label}: fp32 worst abs err {err:.3g}")
        assert err <= FP32_ATOL, f"{label}: {err}"
    else:
        ref = attention_torch(q.float(), k.float(), v.float(), positions, scale)
        err = (out.float() - ref).abs().max().item()
        base = (plain_bf16_attention(q, k, v, positions, scale).float() - ref).abs().max().item()
        print(f"{label}: bf16 worst abs err {err:.3g} (plain torch bf16: {base:.3g})")
        assert err <= 2 * base, f"{label}: {err} > 2 x {base}"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("T,start", [(17, 0), (70, 91)], ids=["T17", "T70-after-91"])
def test_prompt(heads, T, start, dtype):
    """A prompt from position 0 and a chunk after a cached prefix; lengths not multiples
    of any block. T = 70 takes the tiled prefill path for every group size; T = 17 takes
    it for groups >= 4 (and in fp32) and the packed decode tile (17 * group rows) below."""
    n_heads, n_kv, head_dim = heads
    q, k, v = make_qkv(n_heads, n_kv, head_dim, T, start + T + 3, dtype)
    path = "decode" if T * (n_heads // n_kv) <= _decode_max_rows(dtype) else "prefill"
    check(q, k, v, torch.arange(start, start + T, device=DEVICE), f"{path} {heads} T={T} start={start}")


@pytest.mark.parametrize("heads,dtype", [(HEADS[0], torch.bfloat16), (HEADS[1], torch.float32)],
                         ids=[HEAD_IDS[0] + "-bf16", HEAD_IDS[1] + "-fp32"])
def test_prefill_300(heads, dtype):
    n_heads, n_kv, head_dim = heads
    q, k, v = make_qkv(n_heads, n_kv, head_dim, 300, 300, dtype, seed=1)
    check(q, k, v, torch.arange(300, device=DEVICE), f"prefill {heads} T=300")


def test_prefill_unsorted_positions_sharp_scores():
    """Rows of one tile at scattered positions (each row its own causal limit) and
    large logits, which stress the running-max rescale."""
    q, k, v = make_qkv(9, 3, 64, 70, 200, torch.float32, seed=2, q_scale=8.0)
    positions = torch.randperm(200, generator=torch.Generator().manual_seed(3))[:70].to(DEVICE)
    check(q, k, v, positions, "prefill unsorted")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("pos", [0, 256, 1000])
def test_decode(heads, pos, dtype):
    """Split-KV path, T = 1: position 0 (one key), one key past a block, and a length
    spread over all splits; at the first two some splits are empty."""
    n_heads, n_kv, head_dim = heads
    q, k, v = make_qkv(n_heads, n_kv, head_dim, 1, pos + 5, dtype, seed=pos)
    check(q, k, v, torch.tensor([pos], device=DEVICE), f"decode {heads} pos={pos}")


@pytest.mark.parametrize("heads", [HEADS[0], HEADS[2]], ids=[HEAD_IDS[0], HEAD_IDS[2]])
def test_decode_small_T(heads):
    """A few new tokens at once (T * group rows packed in one tile, each row with its own
    limit) and a split boundary falling between their positions."""
    n_heads, n_kv, head_dim = heads
    T = 3
    q, k, v = make_qkv(n_heads, n_kv, head_dim, T, 600, torch.bfloat16, seed=4)
    check(q, k, v, torch.tensor([510, 511, 512], device=DEVICE), f"decode {heads} T=3")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_decode_at_70k(dtype):
    """Decode at position 70_000 over a full 70k cache (one KV head of a group of 4,
    head_dim 128, to keep the interpreter's run and the reference's memory small)."""
    pos = 70_000
    q, k, v = make_qkv(4, 1, 128, 1, pos + 1, dtype, seed=5)
    # A few strong keys far apart: the output depends on every split being merged.
    for row in (3, 35_000, pos):
        k[0, row] = (q[0, 0] * 0.5).to(dtype)
    check(q, k, v, torch.tensor([pos], device=DEVICE), f"decode 4-1-d128 pos={pos}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_decode_and_prefill_agree_at_the_switch(dtype):
    """The largest T on the packed decode path and the smallest on the prefill path."""
    n_heads, n_kv, head_dim = 16, 4, 128
    T = _decode_max_rows(dtype) // 4
    q, k, v = make_qkv(n_heads, n_kv, head_dim, T + 1, 300, dtype, seed=6)
    pos = torch.arange(200, 201 + T, device=DEVICE)
    check(q[:T], k, v, pos[:T], f"decode-path {T} rows x 4")
    check(q, k, v, pos, f"prefill-path {T + 1} rows x 4")


def test_rejects_bad_arguments():
    q, k, v = make_qkv(6, 4, 64, 2, 16, torch.float32)
    pos = torch.arange(2, device=DEVICE)
    with pytest.raises(KernelInputError, match="not a multiple"):
        attention_triton(q, k, v, pos, 0.1)
    q, k, v = make_qkv(8, 4, 64, 2, 16, torch.float32)
    with pytest.raises(KernelInputError, match="k_cache"):
        attention_triton(q, k.bfloat16(), v, pos, 0.1)
    with pytest.raises(KernelInputError, match="positions"):
        attention_triton(q, k, v, pos.float(), 0.1)
    with pytest.raises(KernelInputError, match="differ"):
        attention_triton(q, k, v[:, :8], pos, 0.1)
    q80, k80, v80 = make_qkv(8, 4, 80, 2, 16, torch.float32)
    with pytest.raises(UnsupportedModelError, match="head_dim 80"):
        attention_triton(q80, k80, v80, pos, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA-graph capture of the decode path")
def test_decode_is_graph_capturable():
    """The decode path reads the length from `positions` on the device: captured once in
    a CUDA graph, replays at new positions give the right answer (a host read of
    positions would fail the capture or freeze the first length)."""
    q, k, v = make_qkv(16, 4, 128, 1, 4096, torch.bfloat16, seed=7)
    pos = torch.tensor([100], device=DEVICE)
    attention_triton(q, k, v, pos, 0.1)                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_triton(q, k, v, pos, 0.1)
    for p in (5, 100, 4095):
        pos.fill_(p)
        graph.replay()
        ref = attention_torch(q.float(), k.float(), v.float(), pos, 0.1)
        base = (plain_bf16_attention(q, k, v, pos, 0.1).float() - ref).abs().max().item()
        assert (out.float() - ref).abs().max().item() <= 2 * base
