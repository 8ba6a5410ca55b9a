"""qmatmul_triton (GEMV and tiled paths, repacked planes) against an independent oracle.

Oracle: y = x @ W.T in float64, with W from gguf-py's dequantization of the same
raw blocks (tests/quant_samples.py). Without CUDA the kernels run under
TRITON_INTERPRET=1, set below (and by smollm3_triton.kernels) before any
kernel module is imported.

Tolerances:
- float32 x: |y - y64| <= 1e-5 * (|x| @ |W|.T), elementwise. Any fp32
  evaluation of a K-term dot product is within ~K * 2^-24 of that scale in the
  worst case and ~sqrt(K) * 2^-24 typically (~1e-6 at K = 576); the kernels
  observe <= 1e-7. One wrong quant (an off-by-one nibble, a wrong scale) moves
  an output by >= |x_k w_k| / 8, above 1e-5 of the scale for every K used here.
- bfloat16 x: the flash-attention rule. Against the float64 result on the same
  bf16 inputs, the kernel's max and RMS error are at most twice those of plain
  torch in bf16 (x @ W.to(bfloat16).T, bf16 output).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot is numpy matmul; a BLAS thread per core on a shared machine
# makes it far slower. No effect on results.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from smollm3_triton.errors import KernelInputError, UnsupportedModelError  # noqa: E402
from smollm3_triton.gguf.constants import GGMLType  # noqa: E402
from smollm3_triton.gguf.tensors import QuantTensor, SegmentedTensor, concat_rows  # noqa: E402
from smollm3_triton.kernels.qmatmul import GemmConfig, GemvConfig, qmatmul_torch, qmatmul_triton  # noqa: E402
from smollm3_triton.kernels.repack import PackedTensor, PackedWeight, packed, prepare_weight  # noqa: E402
from tests.helpers.quant_samples import ALL_TYPES, FLOAT_TYPES, QUANT_TYPES, oracle_matrix, random_weight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_REL = 1e-5
ALL_M = [1, 2, 7, 16, 33, 128]
PRIORITY = [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0]
# Columns per type: K-quants two 256-blocks (a multiple of every tile); the legacy
# types SmolLM2's hidden size 576 (not a multiple of the 256-wide GEMV step); float
# weights 200 (not even a multiple of 32).
K_OF = {t: 512 for t in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)}
K_OF.update({t: 576 for t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1)})
K_OF.update({t: 200 for t in FLOAT_TYPES})

worst: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_worst_errors():
    yield
    print("\nqmatmul worst errors:", {k: f"{v:.3g}" for k, v in worst.items()})


def make_x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


def check(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, label: str) -> None:
    """y (from the kernel) against x @ w64.T per the module's tolerances; x on CPU."""
    y = y.cpu()
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w64.shape[0])
    ref = x.double() @ w64.T
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    if x.dtype == torch.float32:
        scale = x.double().abs() @ w64.abs().T
        rel = (err / scale.clamp_min(1e-30)).max().item()
        worst["fp32 rel"] = max(worst.get("fp32 rel", 0.0), rel)
        assert rel <= FP32_REL, f"{label}: error {rel:.2e} of sum|x||w| (allowed {FP32_REL})"
    else:
        plain = (x @ w64.to(x.dtype).T).double()
        plain_err = (plain - ref).abs()
        ratio_max = err.max().item() / plain_err.max().item()
        ratio_rms = err.pow(2).mean().sqrt().item() / plain_err.pow(2).mean().sqrt().item()
        worst["bf16 max ratio"] = max(worst.get("bf16 max ratio", 0.0), ratio_max)
        worst["bf16 rms ratio"] = max(worst.get("bf16 rms ratio", 0.0), ratio_rms)
        assert ratio_max <= 2.0 and ratio_rms <= 2.0, (
            f"{label}: error max {err.max():.3e} rms {err.pow(2).mean().sqrt():.3e}; plain torch bf16 "
            f"max {plain_err.max():.3e} rms {plain_err.pow(2).mean().sqrt():.3e}")


def run(x: torch.Tensor, w, **kw) -> torch.Tensor:
    return qmatmul_triton(x.to(DEVICE), w, **kw)


def _sweep():
    """Every type; priority types at every M, the others at one GEMV and one tiled M; both dtypes."""
    cases = []
    for i, t in enumerate(ALL_TYPES):
        ms = ALL_M if t in PRIORITY else [(1, 2)[i % 2], (7, 16, 33, 128)[i % 4]]
        for j, m in enumerate(ms):
            # M = 128 in fp32 is the interpreter's slowest case (IEEE dots on small tiles); M = 33 covers it.
            dtype = torch.bfloat16 if m == 128 else (torch.float32, torch.bfloat16)[(i + j) % 2]
            cases.append(pytest.param(t, m, dtype, id=f"{t.name}-M{m}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("qtype, m, dtype", _sweep())
def test_types_and_rows(qtype, m, dtype):
    n = 40 if m in (1, 7, 33) else 64          # 40 is no multiple of any tile; 64 is of every one
    k = K_OF[qtype]
    w = random_weight(qtype, n, k, seed=m)
    x = make_x(m, k, dtype)
    check(run(x, prepare_weight(w.to(DEVICE))), x, oracle_matrix(w), f"{qtype.name} M={m}")


@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q5_1, GGMLType.F16])
def test_split_k_gemv(qtype):
    # Q8_0/Q5_1/F16: 800 columns are 4 steps of 256 (the last partial) over 3 slices, so
    # the third slice is empty and must contribute zeros. K-quants: 5 steps, 2 + 2 + 1.
    k = 1280 if qtype in K_OF and K_OF[qtype] == 512 else 800
    w = random_weight(qtype, 48, k, seed=3)
    m, dtype = (1, torch.float32) if qtype in (GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.F16) else (3, torch.bfloat16)
    x = make_x(m, k, dtype)
    y = run(x, prepare_weight(w.to(DEVICE)), config=GemvConfig(block_n=16, split_k=3))
    check(y, x, oracle_matrix(w), f"{qtype.name} split-K GEMV M={m}")


@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0])
def test_split_k_tiled(qtype):
    k = 1024 if qtype != GGMLType.Q8_0 else 800
    w = random_weight(qtype, 40, k, seed=4)
    x = make_x(7, k, torch.bfloat16)
    cfg = GemmConfig(16, 32, 128, num_warps=4, num_stages=2, split_k=3)
    check(run(x, prepare_weight(w.to(DEVICE)), config=cfg), x, oracle_matrix(w), f"{qtype.name} split-K tiled")


def _fused(parts: list[QuantTensor]):
    w = concat_rows(parts)
    w64 = torch.cat([oracle_matrix(p) for p in parts])
    return w, w64


@pytest.mark.parametrize("m, dtype", [(1, torch.float32), (2, torch.bfloat16), (7, torch.float32),
                                      (128, torch.bfloat16)])
def test_fused_qkv_smollm3_scaled(m, dtype):
    """SmolLM3's QKV at 1/8 width: 8 query and 2 KV heads of 32, hidden 256; Q4_K_M gives V Q6_K."""
    hidden = 256
    w, w64 = _fused([random_weight(GGMLType.Q4_K, 256, hidden, 10), random_weight(GGMLType.Q4_K, 64, hidden, 11),
                     random_weight(GGMLType.Q6_K, 64, hidden, 12)])
    assert isinstance(w, SegmentedTensor) and [p.qtype for p in w.parts] == [GGMLType.Q4_K, GGMLType.Q6_K]
    pw = prepare_weight(w.to(DEVICE))
    assert isinstance(pw, PackedWeight) and [p.shape for p in pw.parts] == [(320, hidden), (64, hidden)]
    x = make_x(m, hidden, dtype)
    check(run(x, pw), x, w64, f"fused QKV M={m}")


@pytest.mark.parametrize("m, dtype", [(1, torch.bfloat16), (16, torch.float32)])
def test_fused_qkv_smollm2_scaled(m, dtype):
    """SmolLM2-135M's QKV (hidden 576, 9 query / 3 KV heads) at head_dim 16: Q5_0 Q/K and a Q8_0 V."""
    hidden = 576
    w, w64 = _fused([random_weight(GGMLType.Q5_0, 144, hidden, 20), random_weight(GGMLType.Q5_0, 48, hidden, 21),
                     random_weight(GGMLType.Q8_0, 48, hidden, 22)])
    x = make_x(m, hidden, dtype)
    check(run(x, prepare_weight(w.to(DEVICE))), x, w64, f"SmolLM2 QKV M={m}")


@pytest.mark.parametrize("name, qtype, n, k, m", [
    ("down", GGMLType.Q6_K, 256, 768, 1),        # SmolLM3 ffn_down at 1/8 (Q6_K in Q4_K_M files)
    ("down", GGMLType.Q4_K, 256, 768, 7),
    ("lm_head", GGMLType.Q6_K, 1000, 256, 1),    # tied embedding, vocab cut to 1000 rows
])
def test_model_shapes(name, qtype, n, k, m):
    w = random_weight(qtype, n, k, seed=n)
    x = make_x(m, k, torch.bfloat16)
    check(run(x, prepare_weight(w.to(DEVICE))), x, oracle_matrix(w), f"{name} {qtype.name} M={m}")


def test_matches_qmatmul_torch():
    pytest.importorskip("smollm3_triton.gguf.dequant")
    for qtype, m in ((GGMLType.Q4_K, 1), (GGMLType.Q5_0, 33)):
        w = random_weight(qtype, 40, K_OF[qtype], seed=5).to(DEVICE)
        x = make_x(m, K_OF[qtype], torch.float32).to(DEVICE)
        ref = qmatmul_torch(x, w).double()
        scale = x.double().abs() @ w.dequantize().double().abs().T
        assert ((qmatmul_triton(x, prepare_weight(w)).double() - ref).abs() / scale).max() <= FP32_REL


def test_raw_weights_are_packed_once():
    """Unprepared weights work, and repeated calls reuse one packing (no per-forward repack)."""
    w = concat_rows([random_weight(GGMLType.Q4_K, 32, 256, 6), random_weight(GGMLType.Q6_K, 16, 256, 7)]).to(DEVICE)
    first = packed(w)
    assert packed(w) is first
    x = make_x(1, 256, torch.float32)
    check(run(x, w), x, torch.cat([oracle_matrix(p) for p in w.parts]), "raw segmented")
    assert packed(w) is first


def test_strided_activations():
    w = random_weight(GGMLType.Q4_K, 40, 256, 8)
    big = make_x(3, 300, torch.float32)
    x = big[:, :256]                          # row stride 300
    check(run(x, prepare_weight(w.to(DEVICE))), x.contiguous(), oracle_matrix(w), "row-strided x")
    xt = make_x(256, 7, torch.float32).T      # column stride != 1
    check(run(xt, prepare_weight(w.to(DEVICE))), xt.contiguous(), oracle_matrix(w), "transposed x")


def test_empty_batch():
    w = prepare_weight(random_weight(GGMLType.Q8_0, 8, 64).to(DEVICE))
    assert run(torch.zeros(0, 64), w).shape == (0, 8)


# ----------------------------------------------------------------------------- repacking

@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_planes_hold_the_gguf_values(qtype):
    """The repacked planes decode (in torch) to exactly gguf-py's values: nothing is requantized."""
    w = random_weight(qtype, 6, 512, seed=9)
    pw = prepare_weight(w)
    assert torch.equal(pw.dequantize().double(), oracle_matrix(w))
    assert torch.equal(pw.rows(2, 5).dequantize().double(), oracle_matrix(w)[2:5])
    # The embedding lookup of a tied, prepared embedding/LM head.
    rows = torch.tensor([4, 0, 4])
    assert torch.equal(pw.dequantize_rows(rows, torch.float32).double(), oracle_matrix(w)[rows])
    for plane in pw.planes:
        if plane is not None:
            assert plane.stride(0) * plane.element_size() % 16 == 0 and plane.stride(1) == 1


def test_float_weights_are_not_copied():
    w = random_weight(GGMLType.BF16, 8, 64)
    pw = prepare_weight(w)
    assert isinstance(pw, PackedTensor) and pw.q.data_ptr() == w.data.data_ptr()
    assert prepare_weight(pw) is pw


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_problem():
    w = prepare_weight(random_weight(GGMLType.Q4_K, 8, 256).to(DEVICE))
    with pytest.raises(KernelInputError, match="has 128 columns"):
        run(torch.zeros(1, 128), w)
    with pytest.raises(KernelInputError, match="2-D"):
        run(torch.zeros(1, 1, 256), w)
    with pytest.raises(KernelInputError, match="float32, float16 or bfloat16"):
        run(torch.zeros(1, 256, dtype=torch.int32), w)
    with pytest.raises(KernelInputError, match="at most 4 rows"):
        run(torch.zeros(5, 256), w, config=GemvConfig())
    with pytest.raises(UnsupportedModelError, match="Q2_K"):
        prepare_weight(QuantTensor(torch.zeros(4, 84, dtype=torch.uint8), GGMLType.Q2_K, (4, 256)))
    with pytest.raises(UnsupportedModelError, match="not a multiple of the 256-element block"):
        prepare_weight(QuantTensor(torch.zeros(4, 144, dtype=torch.uint8), GGMLType.Q4_K, (4, 288)))
    with pytest.raises(UnsupportedModelError, match=r"expected uint8 data \[4, 144\]"):
        prepare_weight(QuantTensor(torch.zeros(4, 140, dtype=torch.uint8), GGMLType.Q4_K, (4, 256)))



def test_rows_pick_the_gemv_or_the_tiled_path(monkeypatch):
    """M = 1..GEMV_MAX_M (4): the GEMV kernel, one program decoding each weight tile once
    for all M rows; M = 5..64 (batched decode) and beyond: tl.dot tiles of the GEMM kernel."""
    from smollm3_triton.kernels import qmatmul as qm
    assert qm.GEMV_MAX_M == 4
    seen = []
    real = qm._launch
    monkeypatch.setattr(qm, "_launch", lambda x, y, p, col0, split, path, cfg: (seen.append((x.shape[0], path)),
                                                                                real(x, y, p, col0, split, path, cfg)))
    w = prepare_weight(random_weight(GGMLType.Q8_0, 16, 64, seed=6).to(DEVICE))
    for m in (1, 2, 4, 5, 16, 64):
        qmatmul_triton(make_x(m, 64, torch.float32).to(DEVICE), w)
    assert seen == [(1, "gemv"), (2, "gemv"), (4, "gemv"), (5, "gemm"), (16, "gemm"), (64, "gemm")]


def test_a_row_barely_depends_on_the_batch():
    """Batch invariance of the Triton path, measured: row 0 computed alone (GEMV) and in
    batches of 4 (GEMV), 8, 16 (16x64 tiles) and 64 rows (64x64 tiles). Different paths
    sum in different orders, so rows agree to fp32 rounding, not bit for bit
    (the torch reference is bit-identical from 16 rows down to 1)."""
    qtype = GGMLType.Q4_K
    w = prepare_weight(random_weight(qtype, 48, K_OF[qtype], seed=7).to(DEVICE))
    x = make_x(64, K_OF[qtype], torch.float32, seed=8).to(DEVICE)
    alone = qmatmul_triton(x[:1], w).double()
    worst = 0.0
    for m in (4, 8, 16, 64):
        row = qmatmul_triton(x[:m], w)[:1].double()
        worst = max(worst, ((row - alone).abs() / alone.abs().max()).max().item())
    print(f"qmatmul row 0 alone vs in batches of 4..64: max diff {worst:.2e} of the row's largest value")
    assert worst <= 1e-5
