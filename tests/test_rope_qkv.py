"""rope_qkv_triton against rope_qkv_torch, and RoPE at long positions against float64 math.

Without CUDA the kernels run under TRITON_INTERPRET=1 (smollm3_triton.kernels sets it
before any kernel is decorated).
"""
import pytest
import torch

from smollm3_triton.errors import KernelInputError, UnsupportedModelError
from smollm3_triton.gguf.constants import GGMLType
from smollm3_triton.gguf.tensors import QuantTensor
from smollm3_triton.kernels.rope_qkv import rope_qkv_torch, rope_qkv_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIDDEN = 64
THETA = 5e6          # SmolLM3-3B's rope_theta
# (n_heads, n_kv_heads, head_dim): SmolLM3-3B, SmolLM2-135M, SmolLM2-360M, plain MHA.
HEADS = [(16, 4, 128), (9, 3, 64), (15, 5, 64), (8, 8, 128)]


pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_to_nearest")


def rope_tables(max_seq: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq, head_dim/2] as the model builds them: angles in float64, stored fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(max_seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)


def make_case(n_heads, n_kv, head_dim, T, max_seq, dtype, seed=0, block_size=16):
    g = torch.Generator().manual_seed(seed)
    n_out = (n_heads + 2 * n_kv) * head_dim
    wdtype = {torch.float32: (torch.float32, GGMLType.F32), torch.bfloat16: (torch.bfloat16, GGMLType.BF16)}[dtype]
    w = QuantTensor((torch.randn(n_out, HIDDEN, generator=g) / HIDDEN ** 0.5).to(wdtype[0]).to(DEVICE),
                    wdtype[1], (n_out, HIDDEN))
    x = torch.randn(T, HIDDEN, generator=g).to(dtype).to(DEVICE)
    # Paged caches start full of noise, so a write to a wrong slot or a missing write shows.
    n_blocks = -(-max_seq // block_size) + 3
    k_cache = torch.randn(n_blocks, n_kv, block_size, head_dim, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(n_blocks, n_kv, block_size, head_dim, generator=g).to(dtype).to(DEVICE)
    return w, x, k_cache, v_cache


def slots_for(positions, n_blocks, block_size, seed=0, skip=()):
    """Slot of each position through a random non-contiguous block table (-1 at the
    indices in skip: rows that must not be written)."""
    table = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed + 100))
    pos = positions.cpu()
    slots = table[pos // block_size] * block_size + pos % block_size
    for i in skip:
        slots[i] = -1
    return slots.to(DEVICE)


def assert_close(name, got, want, dtype):
    # fp32: the same fp32 formula, so only FMA contraction or a different GEMM
    # accumulation order separates them. bf16: both round one fp32 value, so they may
    # differ by one bf16 rounding step (2^-8 relative).
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2 ** -7, 1e-3)
    err = (got.float() - want.float()).abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return err


@pytest.mark.parametrize("use_rope,dtype", [(True, torch.float32), (True, torch.bfloat16), (False, torch.bfloat16)],
                         ids=["rope-fp32", "rope-bf16", "nope-bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}-d{h[2]}")
@pytest.mark.parametrize("T,start,block_size", [(1, 37, 16), (17, 5, 32)], ids=["T1-bs16", "T17-bs32"])
def test_matches_reference(heads, T, start, block_size, use_rope, dtype):
    n_heads, n_kv, head_dim = heads
    max_seq = 48
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, T, max_seq, dtype, block_size=block_size)
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    positions = torch.arange(start, start + T, device=DEVICE)
    # A padding row (slot -1) in the chunk: its q is returned, its K/V never written.
    slots = slots_for(positions, k_cache.shape[0], block_size, skip=(T // 2,) if T > 1 else ())
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = rope_qkv_torch(x, w, positions, cos, sin, k_ref, v_ref, slots, n_heads, n_kv, head_dim, use_rope)
    q = rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, use_rope)
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype
    errs = [assert_close("q", q, q_ref, dtype), assert_close("k_cache", k_cache, k_ref, dtype),
            assert_close("v_cache", v_cache, v_ref, dtype)]
    print(f"rope_qkv {heads} T={T} start={start} bs={block_size} rope={use_rope} {dtype}: "
          f"worst abs err {max(errs):.3g}")


def test_skipped_slots_write_nothing():
    """Every row slot -1 (a CUDA-graph padding batch): q is computed, the caches are untouched."""
    n_heads, n_kv, head_dim, T = 4, 2, 64, 5
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, T, 32, torch.float32)
    cos, sin = rope_tables(32, head_dim, THETA)
    k0, v0 = k_cache.clone(), v_cache.clone()
    slots = torch.full((T,), -1, dtype=torch.int64, device=DEVICE)
    positions = torch.zeros(T, dtype=torch.int64, device=DEVICE)
    q = rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, True)
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)
    assert torch.isfinite(q).all()


def test_long_prompt_scattered_positions_and_cache_dtype():
    """A 100-token chunk at shuffled positions, int32 positions and slots, writing into a
    cache of another dtype."""
    n_heads, n_kv, head_dim, T, max_seq = 9, 3, 64, 100, 400
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, T, max_seq, torch.float32, seed=1)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    positions = torch.randperm(max_seq, generator=torch.Generator().manual_seed(2))[:T].to(DEVICE)
    slots = slots_for(positions, k_cache.shape[0], 16, seed=1).int()
    positions = positions.int()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = rope_qkv_torch(x, w, positions, cos, sin, k_ref, v_ref, slots, n_heads, n_kv, head_dim, True)
    q = rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, True)
    assert_close("q", q, q_ref, torch.float32)
    assert_close("k_cache", k_cache, k_ref, torch.bfloat16)
    assert_close("v_cache", v_cache, v_ref, torch.bfloat16)


def test_rope_at_70k_matches_float64():
    """Positions past 64k at theta 5e6: the kernel's q and cached k must equal RoPE done
    in float64 from scratch (angles p * theta^(-2i/d) never rounded to fp32)."""
    n_heads, n_kv, head_dim = 4, 1, 128
    positions_list = [65_537, 69_999, 70_000]
    max_seq = positions_list[-1] + 1
    T = len(positions_list)
    # A small pool: the slots need not follow the positions (the test reads them back).
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, T, 16, torch.float32, seed=3)
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    positions = torch.tensor(positions_list, device=DEVICE)
    slots = torch.tensor([5, 17, 30], device=DEVICE)
    q = rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, True)

    qkv = (x.double() @ w.dequantize(torch.float64).T).cpu()
    q64 = qkv[:, :n_heads * head_dim].view(T, n_heads, head_dim)
    k64 = qkv[:, n_heads * head_dim:(n_heads + n_kv) * head_dim].view(T, n_kv, head_dim)
    v64 = qkv[:, (n_heads + n_kv) * head_dim:].view(T, n_kv, head_dim)
    half = head_dim // 2
    inv_freq = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    ang = torch.tensor(positions_list, dtype=torch.float64)[:, None, None] * inv_freq

    def rope64(t):
        a, b = t[..., :half], t[..., half:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

    def cached(c):
        return c[slots // 16, :, slots % 16].cpu().double()             # [T, n_kv, D]

    # fp32 storage of the table (6e-8 relative) and fp32 GEMM/rotation arithmetic: a few
    # 1e-7 of the values' scale. Angles rounded to fp32 at p = 70k are off by up to
    # 70k * 2^-24 ~ 4e-3 rad, three orders above this bound (checked below).
    tol = 1e-5 * q64.abs().max().item()
    err_q = (q.cpu().double() - rope64(q64)).abs().max().item()
    err_k = (cached(k_cache) - rope64(k64)).abs().max().item()
    err_v = (cached(v_cache) - v64).abs().max().item()
    print(f"rope at 70k vs float64: q {err_q:.3g}, k {err_k:.3g}, v {err_v:.3g} (tol {tol:.3g})")
    assert err_q <= tol and err_k <= tol and err_v <= tol

    # The bound has teeth: a table whose angles were computed in fp32 fails it.
    inv32 = inv_freq.float()
    ang32 = (torch.tensor(positions_list, dtype=torch.float32)[:, None] * inv32)[:, None, :].double()
    a, b = q64[..., :half], q64[..., half:]
    q_fp32_angles = torch.cat([a * ang32.cos() - b * ang32.sin(), b * ang32.cos() + a * ang32.sin()], -1)
    assert (q_fp32_angles - rope64(q64)).abs().max().item() > 10 * tol


HUGE_BLOCK_STRIDE = 2**30 + 64      # fits int32; block 2 * stride does not


def huge_stride_cache(n_kv, head_dim, block_size):
    """A [3, n_kv, block_size, head_dim] bf16 view whose block stride is 2^30 + 64
    elements, over an untouched 4 GiB allocation (the kernel touches 3 blocks' pages):
    block 2 starts past element 2^31, so an int32 block * stride would wrap."""
    per_block = n_kv * block_size * head_dim
    base = torch.empty(2 * HUGE_BLOCK_STRIDE + per_block, dtype=torch.bfloat16)
    return base.as_strided((3, n_kv, block_size, head_dim),
                           (HUGE_BLOCK_STRIDE, block_size * head_dim, head_dim, 1))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter check; the GPU runs it in test_attention's gpu case")
def test_block_offsets_are_int64():
    """Writes into block 2 of a pool whose block stride times 2 exceeds 2^31 elements,
    read back through torch's own (int64) indexing."""
    n_heads, n_kv, head_dim, bs = 4, 2, 64, 16
    try:
        k_cache, v_cache = huge_stride_cache(n_kv, head_dim, bs), huge_stride_cache(n_kv, head_dim, bs)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve 2 x 4 GiB of address space: {e}")
    for c in (k_cache, v_cache):
        c[2].zero_()
    w, x, _, _ = make_case(n_heads, n_kv, head_dim, 2, 64, torch.bfloat16)
    cos, sin = rope_tables(64, head_dim, THETA)
    positions = torch.tensor([3, 40])
    slots = torch.tensor([2 * bs + 3, 2 * bs + 9])
    k_ref, v_ref = torch.zeros(3, n_kv, bs, head_dim, dtype=torch.bfloat16), \
        torch.zeros(3, n_kv, bs, head_dim, dtype=torch.bfloat16)
    rope_qkv_torch(x, w, positions, cos, sin, k_ref, v_ref, slots, n_heads, n_kv, head_dim, True)
    rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, True)
    assert k_cache.stride(0) * 2 > 2**31
    assert_close("k block 2", k_cache[2], k_ref[2], torch.bfloat16)
    assert_close("v block 2", v_cache[2], v_ref[2], torch.bfloat16)
    assert k_cache[2].abs().sum() > 0


def test_rejects_bad_arguments():
    n_heads, n_kv, head_dim, max_seq = 4, 2, 64, 16
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, 2, max_seq, torch.float32)
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    pos = torch.arange(2, device=DEVICE)
    slots = pos.clone()
    with pytest.raises(KernelInputError, match="output rows"):
        rope_qkv_triton(x, w, pos, cos, sin, k_cache, v_cache, slots, n_heads + 1, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="cos"):
        rope_qkv_triton(x, w, pos, cos[:, :8], sin[:, :8], k_cache, v_cache, slots, n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="positions"):
        rope_qkv_triton(x, w, pos[:1], cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="slot_mapping"):
        rope_qkv_triton(x, w, pos, cos, sin, k_cache, v_cache, slots.float(), n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="k_cache"):
        rope_qkv_triton(x, w, pos, cos, sin, k_cache[:, :1], v_cache, slots, n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="k_cache"):
        rope_qkv_triton(x, w, pos, cos, sin, k_cache[0], v_cache, slots, n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="block_size 3"):
        rope_qkv_triton(x, w, pos, cos, sin, k_cache[:, :, :3], v_cache[:, :, :3], slots,
                        n_heads, n_kv, head_dim, True)
    n_out = (4 + 2 * 2) * 80
    w80 = QuantTensor(torch.zeros(n_out, HIDDEN, device=DEVICE), GGMLType.F32, (n_out, HIDDEN))
    cache80 = torch.zeros(2, 2, 16, 80, device=DEVICE)
    c80, s80 = rope_tables(max_seq, 80, THETA)
    with pytest.raises(UnsupportedModelError, match="head_dim 80"):
        rope_qkv_triton(x, w80, pos, c80, s80, cache80, cache80.clone(), slots, 4, 2, 80, True)
