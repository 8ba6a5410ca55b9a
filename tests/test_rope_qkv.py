"""rope_qkv_triton against rope_qkv_torch, and RoPE at long positions against float64 math.

Without CUDA the kernels run under TRITON_INTERPRET=1 (smollm3_triton.kernels sets it
before any kernel is decorated).
"""
import pytest
import torch

from smollm3_triton.errors import KernelInputError, UnsupportedModelError
from smollm3_triton.kernels.rope_qkv import rope_qkv_torch, rope_qkv_triton
from smollm3_triton.quant import GGMLType, QuantTensor

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


def make_case(n_heads, n_kv, head_dim, T, max_seq, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_out = (n_heads + 2 * n_kv) * head_dim
    wdtype = {torch.float32: (torch.float32, GGMLType.F32), torch.bfloat16: (torch.bfloat16, GGMLType.BF16)}[dtype]
    w = QuantTensor((torch.randn(n_out, HIDDEN, generator=g) / HIDDEN ** 0.5).to(wdtype[0]).to(DEVICE),
                    wdtype[1], (n_out, HIDDEN))
    x = torch.randn(T, HIDDEN, generator=g).to(dtype).to(DEVICE)
    # Caches start full of noise, so a write to a wrong row or a missing write shows.
    k_cache = torch.randn(n_kv, max_seq, head_dim, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(n_kv, max_seq, head_dim, generator=g).to(dtype).to(DEVICE)
    return w, x, k_cache, v_cache


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
@pytest.mark.parametrize("T,start", [(1, 37), (17, 5)])
def test_matches_reference(heads, T, start, use_rope, dtype):
    n_heads, n_kv, head_dim = heads
    max_seq = 48
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, T, max_seq, dtype)
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    positions = torch.arange(start, start + T, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = rope_qkv_torch(x, w, positions, cos, sin, k_ref, v_ref, n_heads, n_kv, head_dim, use_rope)
    q = rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, head_dim, use_rope)
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype
    errs = [assert_close("q", q, q_ref, dtype), assert_close("k_cache", k_cache, k_ref, dtype),
            assert_close("v_cache", v_cache, v_ref, dtype)]
    print(f"rope_qkv {heads} T={T} start={start} rope={use_rope} {dtype}: worst abs err {max(errs):.3g}")


def test_long_prompt_scattered_positions_and_cache_dtype():
    """A 100-token chunk at shuffled positions, writing into a cache of another dtype."""
    n_heads, n_kv, head_dim, T, max_seq = 9, 3, 64, 100, 400
    w, x, _, _ = make_case(n_heads, n_kv, head_dim, T, max_seq, torch.float32, seed=1)
    k_cache = torch.randn(n_kv, max_seq, head_dim).to(torch.bfloat16).to(DEVICE)
    v_cache = torch.randn(n_kv, max_seq, head_dim).to(torch.bfloat16).to(DEVICE)
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    positions = torch.randperm(max_seq, generator=torch.Generator().manual_seed(2))[:T].to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = rope_qkv_torch(x, w, positions, cos, sin, k_ref, v_ref, n_heads, n_kv, head_dim, True)
    q = rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, head_dim, True)
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
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, T, max_seq, torch.float32, seed=3)
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    positions = torch.tensor(positions_list, device=DEVICE)
    q = rope_qkv_triton(x, w, positions, cos, sin, k_cache, v_cache, n_heads, n_kv, head_dim, True)

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

    # fp32 storage of the table (6e-8 relative) and fp32 GEMM/rotation arithmetic: a few
    # 1e-7 of the values' scale. Angles rounded to fp32 at p = 70k are off by up to
    # 70k * 2^-24 ~ 4e-3 rad, three orders above this bound (checked below).
    tol = 1e-5 * q64.abs().max().item()
    err_q = (q.cpu().double() - rope64(q64)).abs().max().item()
    err_k = (k_cache[:, positions].transpose(0, 1).cpu().double() - rope64(k64)).abs().max().item()
    err_v = (v_cache[:, positions].transpose(0, 1).cpu().double() - v64).abs().max().item()
    print(f"rope at 70k vs float64: q {err_q:.3g}, k {err_k:.3g}, v {err_v:.3g} (tol {tol:.3g})")
    assert err_q <= tol and err_k <= tol and err_v <= tol

    # The bound has teeth: a table whose angles were computed in fp32 fails it.
    inv32 = inv_freq.float()
    ang32 = (torch.tensor(positions_list, dtype=torch.float32)[:, None] * inv32)[:, None, :].double()
    a, b = q64[..., :half], q64[..., half:]
    q_fp32_angles = torch.cat([a * ang32.cos() - b * ang32.sin(), b * ang32.cos() + a * ang32.sin()], -1)
    assert (q_fp32_angles - rope64(q64)).abs().max().item() > 10 * tol


def test_rejects_bad_arguments():
    n_heads, n_kv, head_dim, max_seq = 4, 2, 64, 16
    w, x, k_cache, v_cache = make_case(n_heads, n_kv, head_dim, 2, max_seq, torch.float32)
    cos, sin = rope_tables(max_seq, head_dim, THETA)
    pos = torch.arange(2, device=DEVICE)
    with pytest.raises(KernelInputError, match="output rows"):
        rope_qkv_triton(x, w, pos, cos, sin, k_cache, v_cache, n_heads + 1, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="cos"):
        rope_qkv_triton(x, w, pos, cos[:, :8], sin[:, :8], k_cache, v_cache, n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="positions"):
        rope_qkv_triton(x, w, pos[:1], cos, sin, k_cache, v_cache, n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="k_cache"):
        rope_qkv_triton(x, w, pos, cos, sin, k_cache[:1], v_cache, n_heads, n_kv, head_dim, True)
    with pytest.raises(KernelInputError, match="RoPE tables cover"):
        rope_qkv_triton(x, w, pos, cos[:8], sin[:8], k_cache, v_cache, n_heads, n_kv, head_dim, True)
    n_out = (4 + 2 * 2) * 80
    w80 = QuantTensor(torch.zeros(n_out, HIDDEN, device=DEVICE), GGMLType.F32, (n_out, HIDDEN))
    cache80 = torch.zeros(2, max_seq, 80, device=DEVICE)
    c80, s80 = rope_tables(max_seq, 80, THETA)
    with pytest.raises(UnsupportedModelError, match="head_dim 80"):
        rope_qkv_triton(x, w80, pos, c80, s80, cache80, cache80.clone(), 4, 2, 80, True)
