"""attention_triton (varlen prefill and split-KV decode over block tables) against attention_torch.

Without CUDA the kernels run under TRITON_INTERPRET=1 (smollm3_triton.kernels sets it
before any kernel is decorated). Pools start full of noise and block tables are random
permutations, so a read through a wrong block shows. bf16 follows the flash-attention
rule: against an fp32 reference on the same bf16 inputs, the kernel's error is at most
twice that of plain torch attention computed in bf16.
"""
import pytest
import torch

from smollm3_triton.errors import KernelInputError, UnsupportedModelError
from smollm3_triton.kernels.attention import attention_triton
from smollm3_triton.kernels.attention_reference import attention_torch
from tests.helpers.attention_cases import DEVICE, HEAD_IDS, HEADS, MIXED, Case

DTYPES = [torch.float32, torch.bfloat16]
# fp32: both sides sum the same fp32 products in different orders (and the kernel's
# softmax is exp2 of prescaled scores); observed worst ~1e-6 at these sizes.
FP32_ATOL = 2e-5

pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_to_nearest")


def plain_bf16_attention(case: Case) -> torch.Tensor:
    """Attention as eager torch runs it in bf16 (the flash-attention test's baseline):
    bf16 matmuls, fp32 softmax rounded to bf16; sequence by sequence."""
    q = case.q
    N, H, D = q.shape
    n_kv, bs = case.k.shape[1], case.k.shape[2]
    out = torch.zeros_like(q)
    for b, (q_len, L) in enumerate(case.seqs):
        if L == 0:
            continue
        blocks = case.block_tables[b, :-(-L // bs)].long()
        k = case.k[blocks].permute(1, 0, 2, 3).reshape(n_kv, -1, D)[:, :L].repeat_interleave(H // n_kv, 0)
        v = case.v[blocks].permute(1, 0, 2, 3).reshape(n_kv, -1, D)[:, :L].repeat_interleave(H // n_kv, 0)
        qb = q[case.rows(b)].transpose(0, 1)                                   # [H, q_len, D]
        scores = torch.matmul(qb, k.transpose(1, 2)) * case.scale
        pos = L - q_len + torch.arange(q_len, device=q.device)
        visible = torch.arange(L, device=q.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        p = scores.float().softmax(-1).to(q.dtype)
        out[case.rows(b)] = torch.matmul(p, v).transpose(0, 1)
    return out


def check(case: Case, label: str) -> torch.Tensor:
    out = attention_triton(*case.args())
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    for b, (_, L) in enumerate(case.seqs):
        if L == 0:
            assert torch.equal(out[case.rows(b)], torch.zeros_like(out[case.rows(b)])), f"{label}: padding row"
    if case.q.dtype == torch.float32:
        ref = attention_torch(*case.args())
        err = (out - ref).abs().max().item()
        print(f"{label}: fp32 worst abs err {err:.3g}")
        assert err <= FP32_ATOL, f"{label}: {err}"
    else:
        ref = attention_torch(*case.args(case.q.float(), case.k.float(), case.v.float()))
        err = (out.float() - ref).abs().max().item()
        base = (plain_bf16_attention(case).float() - ref).abs().max().item()
        print(f"{label}: bf16 worst abs err {err:.3g} (plain torch bf16: {base:.3g})")
        assert err <= 2 * base, f"{label}: {err} > 2 x {base}"
    return out


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_mixed_step(heads, dtype, block_size):
    """Prefill chunks (one after a cached prefix) and decodes of different lengths in one step."""
    case = Case(heads, MIXED, dtype, block_size, seed=block_size)
    check(case, f"mixed {heads} bs={block_size}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_decode_batch(heads, dtype):
    """Pure decode step (the CUDA-graph path): lengths 1, one past a block, one spread
    over all splits, and a padding row."""
    case = Case(heads, [(1, 1), (1, 17), (1, 300), (1, 0)], dtype, seed=1)
    check(case, f"decode {heads}")


@pytest.mark.parametrize("heads,dtype", [(HEADS[0], torch.bfloat16), (HEADS[1], torch.float32)],
                         ids=[HEAD_IDS[0] + "-bf16", HEAD_IDS[1] + "-fp32"])
def test_prefill_two_long_chunks(heads, dtype):
    """Two sequences' chunks of 130 and 75 queries, the second after a 200-token prefix:
    several query tiles per sequence, tiles that straddle two sequences' rows."""
    check(Case(heads, [(130, 130), (75, 275)], dtype, seed=2), f"prefill {heads}")


def test_sharp_scores():
    """Large logits stress the running-max rescale and the split merge."""
    check(Case((9, 3, 64), [(33, 100), (1, 250)], torch.float32, seed=3, q_scale=8.0), "sharp scores")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_decode_at_70k(dtype):
    """Decode at position 70_000 over a 70k context (one KV head of a group of 4, head_dim
    128, block size 32, to keep the interpreter's run and the reference's memory small)."""
    case = Case((4, 1, 128), [(1, 70_001)], dtype, block_size=32, seed=5, spare_blocks=0)
    # A few strong keys far apart: the output depends on every split being merged.
    for pos in (3, 35_000, 70_000):
        blk = case.block_tables[0, pos // 32].long()
        case.k[blk, 0, pos % 32] = (case.q[0, 0] * 0.5).to(dtype)
    check(case, "decode 4-1-d128 len=70001")


def test_decode_rows_do_not_depend_on_the_batch():
    """A decode row's result is bit-identical alone, in a bigger decode step and in a step
    where others prefill, and whatever the block table's width (its capacity): every
    one-query row goes through the decode kernel, whose splits are sized by the row's own
    length; the splits a longer table would add exit without touching anything."""
    heads = (16, 4, 128)
    mixed = Case(heads, MIXED, torch.bfloat16, seed=6)
    out = attention_triton(*mixed.args())
    for b in (1, 2):
        alone = Case(heads, [MIXED[b]], torch.bfloat16, seed=6)
        alone.q, alone.k, alone.v = mixed.q[mixed.rows(b)], mixed.k, mixed.v
        needed = -(-MIXED[b][1] // mixed.k.shape[2])
        for width in (needed, 1000):
            table = torch.zeros(1, width, dtype=torch.int32, device=DEVICE)
            table[0, :needed] = mixed.block_tables[b, :needed]
            alone.block_tables = table
            assert torch.equal(attention_triton(*alone.args()), out[mixed.rows(b)]), (b, width)


def test_chunked_prefill_equals_whole_prompt():
    """A 70-token prompt as one chunk, or as chunks of 23 + 47 (the second over the first's
    cache): the same rows. Exact: a row's key blocks start at position 0 either way and a
    block wholly past the row's position is a no-op of the online softmax."""
    heads = (9, 3, 64)
    whole = Case(heads, [(70, 70)], torch.float32, seed=7)
    ref = attention_triton(*whole.args())
    first = attention_triton(whole.q[:23], whole.k, whole.v, torch.tensor([0, 23], dtype=torch.int32, device=DEVICE),
                             torch.tensor([23], dtype=torch.int32, device=DEVICE), whole.block_tables, 23, whole.scale)
    second = attention_triton(whole.q[23:], whole.k, whole.v, torch.tensor([0, 47], dtype=torch.int32, device=DEVICE),
                              whole.seq_lens, whole.block_tables, 47, whole.scale)
    err = (torch.cat([first, second]) - ref).abs().max().item()
    print(f"chunked 23+47 vs whole: max abs diff {err:.3g}")
    assert err <= FP32_ATOL


HUGE_BLOCK_STRIDE = 2**30 + 64      # fits int32; block 2 * stride does not


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter check (uses CPU address space)")
def test_block_offsets_are_int64():
    """Both kernels read block 2 of pools whose block stride is 2^30 + 64 elements (a bf16
    view over an untouched 4 GiB allocation each): block * stride passes 2^31, so an int32
    multiply would wrap and read far outside (a crash or garbage). The stride itself
    fits in int32, as it would be specialised at run time. Compared against the same
    values in a compact pool."""
    n_kv, bs, d = 1, 16, 64
    compact = Case((4, n_kv, d), [(5, 40), (1, 40)], torch.bfloat16, seed=8, spare_blocks=0)
    compact.k, compact.v = compact.k[:3].contiguous(), compact.v[:3].contiguous()
    compact.block_tables = torch.tensor([[1, 2, 0], [2, 0, 1]], dtype=torch.int32, device=DEVICE)

    def huge(src):
        try:
            base = torch.empty(2 * HUGE_BLOCK_STRIDE + n_kv * bs * d, dtype=torch.bfloat16)
        except RuntimeError as e:
            pytest.skip(f"cannot reserve 4 GiB of address space: {e}")
        view = base.as_strided(src.shape, (HUGE_BLOCK_STRIDE, bs * d, d, 1))
        view.copy_(src)
        return view

    k, v = huge(compact.k), huge(compact.v)
    assert k.stride(0) * 2 >= 2**31
    want = attention_triton(*compact.args())
    got = attention_triton(*compact.args(k=k, v=v))
    assert torch.equal(got, want)


def test_rejects_bad_arguments():
    case = Case((8, 4, 64), [(2, 2)], torch.float32)
    q6 = case.q[:, :6]
    with pytest.raises(KernelInputError, match="not a multiple"):
        attention_triton(*case.args(q=q6.contiguous()))
    with pytest.raises(KernelInputError, match="k_cache"):
        attention_triton(*case.args(k=case.k.bfloat16()))
    with pytest.raises(KernelInputError, match="k_cache"):
        attention_triton(*case.args(k=case.k[0], v=case.v[0]))
    with pytest.raises(KernelInputError, match="differ"):
        attention_triton(*case.args(v=case.v[:1]))
    args = list(case.args())
    args[3] = case.query_start.float()
    with pytest.raises(KernelInputError, match="query_start"):
        attention_triton(*args)
    args = list(case.args())
    args[5] = case.block_tables[:, :1].t().contiguous()
    with pytest.raises(KernelInputError, match="block_tables"):
        attention_triton(*args)
    c80 = Case((8, 4, 80), [(2, 2)], torch.float32)
    with pytest.raises(UnsupportedModelError, match="head_dim 80"):
        attention_triton(*c80.args())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA-graph capture of the decode path")
def test_decode_is_graph_capturable():
    """The decode path reads lengths and block tables on the device: captured once in a
    CUDA graph, replays at new lengths and tables give the right answer (a host read
    would fail the capture or freeze the first values)."""
    case = Case((16, 4, 128), [(1, 100), (1, 5)], torch.bfloat16, seed=9, spare_blocks=600, width=300)
    attention_triton(*case.args())                          # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_triton(*case.args())
    for lens in ((5, 100), (4095, 0), (1, 2000)):
        case.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        case.seqs = [(1, L) for L in lens]
        case.block_tables.copy_(torch.randperm(case.k.shape[0])[:600].view(2, 300).int())
        graph.replay()
        ref = attention_torch(*case.args(case.q.float(), case.k.float(), case.v.float()))
        base = (plain_bf16_attention(case).float() - ref).abs().max().item()
        assert (out.float() - ref).abs().max().item() <= 2 * base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA memory for a > 2^31-element pool")
def test_block_stride_past_2_31_on_gpu():
    """A real pool of 2^31 + bf16 elements (4 GiB): the last block's offset passes 2^31."""
    n_kv, bs, d = 4, 16, 128
    per_block = n_kv * bs * d
    n_blocks = 2**31 // per_block + 2
    k = torch.zeros(n_blocks, n_kv, bs, d, dtype=torch.bfloat16, device=DEVICE)
    v = torch.zeros_like(k)
    small = Case((16, n_kv, d), [(3, 20), (1, 20)], torch.bfloat16, seed=10, spare_blocks=0)
    tables = torch.tensor([[n_blocks - 1, n_blocks - 2], [n_blocks - 2, n_blocks - 1]], dtype=torch.int32,
                          device=DEVICE)
    for b in range(2):
        for j in range(2):
            k[tables[b, j]] = small.k[small.block_tables[b, j]]
            v[tables[b, j]] = small.v[small.block_tables[b, j]]
    want = attention_triton(*small.args())
    small.block_tables = tables
    assert torch.equal(attention_triton(*small.args(k=k, v=v)), want)
