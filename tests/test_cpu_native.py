"""The compiled CPU kernels (smollm3_triton._cpu, csrc/cpu/; kernels/cpu_native.py and
kernels/cpu_step.py) against independent oracles.

- packing: rows dequantized from the packed layout bit-equal to gguf-py's dequantization.
- matmuls on every 4/5/6/8-bit type, on each instruction set this CPU has (AVX2, AVX-512):
  gguf-py's matrix in float64. Activations are rounded to int8 per 32 elements (step s =
  the group's largest magnitude / 127), the rest is exact integers and fp32 scaling: each
  output within sum_k |w_k| s_k / 2 (the rounding's worst case) plus 2^-20 of sum_k |w_k x_k|
  (fp32 sums) of gguf-py's float64 result. The legacy types (Q4_0 ... Q8_0) keep int16
  activations (step / 32767; csrc/cpu/qgemm.h says why).
- RMSNorm, RoPE + K/V write, attention: the torch references (attention on fp32 / fp16 /
  bf16 caches against the reference on the same cache read as fp32).
- the decode step in one call: logits bit-equal to model.forward op by op; the engine's
  tokens and logprobs the same with and without it.
- threads: results bit-equal on 1 and 2 threads; rows independent of the batch.
- the residual add inside a matmul: bit-equal to torch's add of the product.
- without the extension (or for a non-fp32 model) the cpu backend is cpu_fast's torch ops.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from smollm3_triton.gguf.constants import GGMLType
from smollm3_triton.gguf.tensors import concat_rows
from smollm3_triton.kernels import cpu_fast, cpu_native
from smollm3_triton.kernels.attention_reference import attention_torch
from smollm3_triton.kernels.rms_norm import rms_norm_torch
from tests.helpers.attention_cases import HEAD_IDS, HEADS, MIXED, Case
from tests.helpers.quant_samples import QUANT_TYPES, oracle_matrix, random_weight

BUILT_HERE = sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64") \
    and "avx2" in open("/proc/cpuinfo").read()
if not cpu_native.AVAILABLE:
    if BUILT_HERE:
        pytest.fail("smollm3_triton._cpu is missing on Linux x86-64 with AVX2, where pip install builds it",
                    pytrace=False)
    pytest.skip("the compiled CPU kernels are built on Linux x86-64 with AVX2 only", allow_module_level=True)

from smollm3_triton import _cpu  # noqa: E402

FP32_SUMS = 2 ** -20
K_QUANTS = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
# Row lengths: whole 256-chunks and every tail (128, 64, 32); K-quants take multiples of 256.
COLS = {t: ([256, 768] if t in K_QUANTS else [32, 96, 576, 800]) for t in QUANT_TYPES}
ISAS = [isa for isa in ("avx2", "avx512") if _cpu.select(isa)]
_cpu.select(ISAS[-1])


@pytest.fixture(params=ISAS)
def isa(request):
    _cpu.select(request.param)
    yield request.param
    _cpu.select(ISAS[-1])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def int8_bound(x: torch.Tensor, w: torch.Tensor, int16: bool = False) -> torch.Tensor:
    """Worst-case |error| of x @ w.T (float64 w) with x rounded to int8 per 32 columns (step:
    the group's largest magnitude / 127), or to int16 (/ 32767: the legacy types)."""
    x = x.double()
    step = x.abs().unflatten(-1, (-1, 32)).amax(-1) / (32767 if int16 else 127)
    return (w.abs() @ (step.repeat_interleave(32, -1) / 2).T).T + FP32_SUMS * x.abs() @ w.abs().T


def check_int8(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, int16: bool = False) -> float:
    """Asserts got within int8_bound of x @ w.T; returns the worst |error| / bound."""
    err = (got.double() - x.double() @ w.T).abs()
    bound = int8_bound(x, w, int16)
    assert bool((err <= bound).all()), f"worst error {float((err / bound).max()):.3f} of the rounding's bound"
    return float((err / bound).max())


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=[t.name for t in QUANT_TYPES])
def test_packed_rows_dequantize_as_gguf_py(qtype):
    for cols in COLS[qtype]:
        w = random_weight(qtype, 37, cols, seed=cols)
        nw = cpu_native.prepare(w)
        assert torch.equal(nw.dequantize(), oracle_matrix(w).float())
        rows = torch.tensor([36, 0, 5, 5])
        assert torch.equal(nw.dequantize_rows(rows), oracle_matrix(w).float()[rows])
    with pytest.raises(IndexError):
        nw.dequantize_rows(torch.tensor([37]))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=[t.name for t in QUANT_TYPES])
def test_matmul_every_type_vs_gguf_py(qtype, isa):
    worst = rel = 0.0
    for cols in COLS[qtype]:
        w = random_weight(qtype, 45, cols, seed=int(qtype) + cols)
        nw = cpu_native.prepare(w)
        x = torch.randn(70, cols, generator=torch.Generator().manual_seed(cols))
        y = cpu_native.qmatmul(x, nw)
        assert y.dtype == torch.float32 and y.shape == (70, 45)
        worst = max(worst, check_int8(y, x, oracle_matrix(w), int16=qtype not in K_QUANTS))
        rel = max(rel, rel_err(y, x.double() @ oracle_matrix(w).T))
        for m in (1, 2, 3, 5, 9):          # a row's result does not depend on the rows beside it
            assert torch.equal(cpu_native.qmatmul(x[:m], nw), y[:m])
            assert torch.equal(cpu_native.qmatmul(x[-m:], nw), y[-m:])
    print(f"{isa} {qtype.name}: worst error {worst:.2f} of the rounding's bound, {rel:.1e} of max |y|")


def test_mixed_type_fused_weight_and_gate_up_swiglu(isa):
    """A Q4_K_M-style fused matrix (Q4_K, Q4_K, Q6_K rows); gate/up of different types."""
    parts = [random_weight(GGMLType.Q4_K, 64, 512, seed=2), random_weight(GGMLType.Q4_K, 32, 512, seed=3),
             random_weight(GGMLType.Q6_K, 32, 512, seed=4)]
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(5))
    check_int8(cpu_native.qmatmul(x, cpu_native.prepare(concat_rows(parts))), x,
               torch.cat([oracle_matrix(p) for p in parts]))
    # a legacy segment (llama.cpp's Q8_0 fallback) sends the whole matrix to the int16 kernels,
    # which read the K-quants' high bits too
    wide = [random_weight(GGMLType.Q8_0, 16, 512, seed=8), random_weight(GGMLType.Q6_K, 40, 512, seed=9),
            random_weight(GGMLType.Q5_K, 24, 512, seed=10)]
    check_int8(cpu_native.qmatmul(x, cpu_native.prepare(concat_rows(wide))), x,
               torch.cat([oracle_matrix(p) for p in wide]), int16=True)
    gate, up = random_weight(GGMLType.Q4_K, 48, 512, seed=6), random_weight(GGMLType.Q6_K, 48, 512, seed=7)
    g, u = x.double() @ oracle_matrix(gate).T, x.double() @ oracle_matrix(up).T
    eg, eu = int8_bound(x, oracle_matrix(gate)), int8_bound(x, oracle_matrix(up))
    h = cpu_native.gate_up_swiglu(x, cpu_native.prepare(concat_rows([gate, up])))
    # silu's slope is within [-0.1, 1.1]: |silu(g + dg)(u + du) - silu(g) u| <= 1.1 |dg| (|u| + |du|)
    # + |silu(g)| |du|, and the product and silu in fp32 add a few ulp
    silu = torch.nn.functional.silu(g)
    bound = 1.1 * eg * (u.abs() + eu) + silu.abs() * eu + 1e-6 * (silu * u).abs()
    assert bool(((h.double() - silu * u).abs() <= bound).all())


def test_add_matmul_adds_the_residual_in_its_tasks():
    """h + x @ W^T with the add inside the matmul's tasks: bit-equal to torch's fp32 add of the
    product (one rounding either way; the product itself is checked against gguf-py above), on
    int8 and int16 kernels, one task and many, 1 and 2 threads; a float weight takes the torch ops."""
    before = torch.get_num_threads()
    try:
        for qtype, rows, cols in ((GGMLType.Q4_K, 1030, 512), (GGMLType.Q4_1, 300, 576)):
            w = random_weight(qtype, rows, cols, seed=int(qtype))
            nw = cpu_native.prepare(w)
            for m in (1, 5, 70):
                g = torch.Generator().manual_seed(m)
                x, h = torch.randn(m, cols, generator=g), torch.randn(m, rows, generator=g)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    got, stats = cpu_native.add_matmul(x, nw, h, 1e-6)
                    assert stats is None and torch.equal(got, h + cpu_native.qmatmul(x, nw)), (qtype, m, threads)
    finally:
        torch.set_num_threads(before)
    dense = cpu_native.prepare(random_weight(GGMLType.F32, 16, 64, seed=1))
    x, h = torch.randn(3, 64), torch.randn(3, 16)
    assert torch.equal(cpu_native.add_matmul(x, dense, h, 1e-6)[0], h + cpu_fast.qmatmul_cpu(x, dense))


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, as the kernel reports it (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_packed_weights_on_huge_pages():
    """A packed matrix of 2 MB or more starts on a 2 MB boundary, its whole 2 MB pages given to
    transparent huge pages; where THP is on, the kernel backs them so once written."""
    w = random_weight(GGMLType.Q4_K, 4096, 1024, seed=11)          # 2.4 MB packed
    nw = cpu_native.prepare(w)
    assert nw.packed[0].data_ptr() % cpu_native.HUGE_PAGE == 0
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(12))
    check_int8(cpu_native.qmatmul(x, nw), x, oracle_matrix(w))
    small = cpu_native.huge_page_buffer(1000)                        # under 2 MB: a plain buffer
    # A long session's heap (how CI's full run met it): after a large free glibc raises its mmap
    # threshold, and a later buffer of this size would come from heap memory already written.
    scratch = torch.empty(20 << 20, dtype=torch.uint8)
    del scratch
    scratch = torch.ones(16 << 20, dtype=torch.uint8)
    del scratch
    assert small.numel() == 1000
    buf = cpu_native.huge_page_buffer(3 * cpu_native.HUGE_PAGE + 100)
    assert buf.numel() == 3 * cpu_native.HUGE_PAGE + 100 and buf.data_ptr() % cpu_native.HUGE_PAGE == 0
    buf.fill_(1)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read()
    if "[never]" not in thp:        # THP off: madvise is a no-op, and the buffer is still correct
        assert anon_huge_kb(buf.data_ptr()) >= 2048, thp


def test_float_weights_and_other_dtypes_take_the_torch_ops():
    w = random_weight(GGMLType.F32, 16, 64, seed=1)
    cw = cpu_native.prepare(w)
    assert isinstance(cw, cpu_fast.CpuWeight)
    x = torch.randn(3, 64)
    assert torch.equal(cpu_native.qmatmul(x, cw), cpu_fast.qmatmul_cpu(x, cw))


@pytest.mark.parametrize("spin_us", [0, 50])
def test_threads_do_not_change_results(spin_us):
    """Every task of a job runs once whatever the threads: more threads than cores, and workers
    that sleep between jobs (spin 0) and so start late, leave their shares to be taken from
    the back by the others (csrc/cpu/pool.c)."""
    legacy = cpu_native.prepare(random_weight(GGMLType.Q4_1, 3072, 576, seed=1))
    kq = random_weight(GGMLType.Q4_K, 1030, 512, seed=2)
    kq_packed = cpu_native.prepare(kq)
    x = torch.randn(7, 576)
    xk = torch.randn(1, 512, generator=torch.Generator().manual_seed(3))
    before, spin = torch.get_num_threads(), _cpu.spin_us()
    runs = {}
    try:
        _cpu.spin_us(spin_us)
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            for _ in range(20):
                got = (cpu_native.qmatmul(x, legacy), cpu_native.gate_up_swiglu(x, legacy),
                       cpu_native.qmatmul(xk, kq_packed))
                runs.setdefault(threads, got)
                assert all(torch.equal(a, b) for a, b in zip(runs[threads], got)), threads
    finally:
        torch.set_num_threads(before)
        _cpu.spin_us(spin)
    check_int8(runs[1][2], xk, oracle_matrix(kq))
    assert all(torch.equal(a, b) for t in (2, 3, 5) for a, b in zip(runs[1], runs[t]))


def test_rms_norm_vs_reference():
    g = torch.Generator().manual_seed(3)
    x, res, w = torch.randn(6, 576, generator=g), torch.randn(6, 576, generator=g), torch.randn(576, generator=g)
    for residual in (None, res):
        y, h = cpu_native.rms_norm(x, w, 1e-5, residual)
        ry, rh = rms_norm_torch(x, w, 1e-5, residual)
        assert torch.equal(h, rh)
        torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rope_and_kv_write_vs_reference(cache_dtype):
    """Same qkv into both: q bit-equal to cpu_fast's rotation (the reference's operation
    order), the caches hold K and V rounded as torch's .to(dtype); slot -1 is not written."""
    n_heads, n_kv, d, T, bs = 4, 2, 64, 6, 16
    g = torch.Generator().manual_seed(6)
    w = cpu_native.prepare(random_weight(GGMLType.Q8_0, (n_heads + 2 * n_kv) * d, 128, seed=6))
    x = torch.randn(T, 128, generator=g)
    positions, slots = torch.tensor([0, 1, 2, 40, 41, 900]), torch.tensor([3, 4, -1, 17, 18, 40])
    theta = 1e4 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(1024, dtype=torch.float64)[:, None] * theta
    cos, sin = angles.cos().float(), angles.sin().float()
    qkv = cpu_native.qmatmul(x, w)
    for use_rope in (True, False):
        caches = [torch.randn(4, n_kv, bs, d, generator=g).to(cache_dtype) for _ in range(2)]
        ref_k, ref_v = caches[0].clone(), caches[1].clone()
        ref = cpu_fast.rope_kv_write(qkv, positions, cos, sin, ref_k, ref_v, slots, n_heads, n_kv, d, use_rope)
        q = cpu_native.rope_qkv(x, w, positions, cos, sin, caches[0], caches[1], slots, n_heads, n_kv, d, use_rope)
        assert torch.equal(q, ref) and torch.equal(caches[0], ref_k) and torch.equal(caches[1], ref_v)
    with pytest.raises(IndexError, match="position 1024"):
        cpu_native.rope_qkv(x[:1], w, torch.tensor([1024]), cos, sin, caches[0], caches[1], slots[:1], n_heads,
                            n_kv, d, True)


ATTN_HEADS = HEADS + [(12, 1, 64), (32, 32, 64)]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", ATTN_HEADS, ids=HEAD_IDS + ["12-1-d64", "32-32-d64"])
def test_attention_vs_reference(heads, cache_dtype):
    """Mixed steps (a prompt chunk after a prefix, decodes, an idle row) and pure decode steps of
    several lengths (spans of 256 keys merged), on block sizes 16 and 8 (a block shorter than the
    kernel's 16-key sub-block)."""
    worst = 0.0
    for block_size, seqs in ((16, MIXED), (16, [(1, 37), (1, 700), (1, 1), (1, 513)]), (8, [(1, 300), (1, 9)])):
        c = Case(heads, seqs, torch.float32, block_size=block_size, seed=len(seqs))
        k, v = c.k.to(cache_dtype), c.v.to(cache_dtype)
        ref = attention_torch(c.q, k.float(), v.float(), *c.args()[3:])
        out = cpu_native.attention(*c.args(k=k, v=v))
        worst = max(worst, float((out - ref).abs().max()))
    print(f"{heads} {cache_dtype}: max abs error {worst:.2e}")
    assert worst <= 2e-5


def test_attention_decode_rows_do_not_depend_on_the_batch():
    c = Case((9, 3, 64), [(1, 600), (1, 37), (1, 300)], torch.float32, seed=4)
    k, v = c.k.half(), c.v.half()
    both = cpu_native.attention(*c.args(k=k, v=v))
    alone = cpu_native.attention(c.q[:1], k, v, c.query_start[:2], c.seq_lens[:1], c.block_tables[:1], 1, c.scale)
    assert torch.equal(both[:1], alone)


# ---------------------------------------------------------------- whole models

@pytest.fixture(scope="module")
def native(smollm2_path):
    from smollm3_triton import Runtime
    return Runtime.load(smollm2_path, device="cpu", backend="cpu", max_seq_len=1024)


def test_runtime_uses_the_kernels_and_an_fp16_cache(native):
    from smollm3_triton.kernels.cpu_step import DecodeStepRunner
    assert isinstance(native.model.weights.layers[0].qkv, cpu_native.NativeWeight)
    assert native.model.cache.k.dtype == torch.float16
    assert isinstance(native.engine.runner.forward, DecodeStepRunner)


def test_decode_step_equals_the_forward(native):
    """A decode step of three sequences of different lengths: the one-call step's logits
    bit-equal to model.forward's (the same kernels, op by op), and the cache writes equal."""
    from smollm3_triton.model import Batch
    eng, model = native.engine, native.model
    prompts = [list(range(100, 100 + n)) for n in (5, 40, 17)]
    with eng.exclusive(12) as blocks, torch.inference_mode():
        bs, tables, slots, used = eng.block_size, [], [], 0
        for p in prompts:
            own = blocks[used:used + 4]
            used += 4
            model.forward(Batch.from_sequences([torch.tensor(p)], own, bs, "cpu"))
            tables.append(own)
            slots.append(own[len(p) // bs] * bs + len(p) % bs)
        step = Batch(token_ids=torch.tensor([7, 8, 9]), positions=torch.tensor([len(p) for p in prompts]),
                     slot_mapping=torch.tensor(slots), query_start=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                     seq_lens=torch.tensor([len(p) + 1 for p in prompts], dtype=torch.int32),
                     block_tables=torch.tensor(tables, dtype=torch.int32), max_query_len=1,
                     logits_rows=torch.tensor([2, 0, 1]))
        k0 = model.cache.k.clone()
        ref = model.forward(step)
        k_ref = model.cache.k.clone()
        model.cache.k.copy_(k0)
        out = eng.runner.forward(step)
        assert torch.equal(out, ref) and torch.equal(model.cache.k, k_ref)


def test_prompt_rows_through_the_step_equal_the_forward(native):
    """A step of two prompts (one continuing a cached prefix, one fresh) in C: each row a
    sequence of its own up to its position; logits and cache writes bit-equal to
    model.forward's prompt path."""
    from smollm3_triton.model import Batch
    eng, model = native.engine, native.model
    with eng.exclusive(8) as blocks, torch.inference_mode():
        bs = eng.block_size
        first, second = blocks[:4], blocks[4:]
        model.forward(Batch.from_sequences([torch.tensor(list(range(200, 223)))], first, bs, "cpu"))   # cached prefix
        a, b = list(range(300, 309)), list(range(400, 431))
        pos_a = list(range(23, 23 + len(a)))
        pos_b = list(range(len(b)))
        step = Batch(token_ids=torch.tensor(a + b), positions=torch.tensor(pos_a + pos_b),
                     slot_mapping=torch.tensor([first[p // bs] * bs + p % bs for p in pos_a] +
                                               [second[p // bs] * bs + p % bs for p in pos_b]),
                     query_start=torch.tensor([0, len(a), len(a) + len(b)], dtype=torch.int32),
                     seq_lens=torch.tensor([23 + len(a), len(b)], dtype=torch.int32),
                     block_tables=torch.tensor([first, second], dtype=torch.int32), max_query_len=len(b),
                     logits_rows=torch.tensor([len(a) - 1, len(a) + len(b) - 1, 3]))
        k0, v0 = model.cache.k.clone(), model.cache.v.clone()
        ref = model.forward(step)
        k_ref, v_ref = model.cache.k.clone(), model.cache.v.clone()
        model.cache.k.copy_(k0)
        model.cache.v.copy_(v0)
        out = eng.runner.forward(step)
        assert torch.equal(out, ref) and torch.equal(model.cache.k, k_ref) and torch.equal(model.cache.v, v_ref)


def test_engine_tokens_and_logprobs_with_and_without_the_step(native):
    from smollm3_triton.sampling_params import SamplingParams
    params = SamplingParams(max_new_tokens=12, temperature=0, logprobs=2)
    prompts = [native.tokenizer.encode(p) for p in ("The capital of France is", "1, 2, 3, 4,", "Once upon a")]

    def run():
        outs = native.engine.run([(p, params) for p in prompts])
        return [[(o.token_ids, o.logprobs[0].logprob, o.logprobs[0].top) for o in seq] for seq in outs]

    step = native.engine.runner.forward
    with_step = run()
    native.engine.runner.forward = native.model.forward
    try:
        without = run()
    finally:
        native.engine.runner.forward = step
    assert with_step == without


def test_real_model_close_to_the_exact_path(smollm2, native):
    ids = smollm2.tokenizer.encode("The Eiffel Tower was built between 1887 and 1889 as the entrance arch "
                                   "of the 1889 World's Fair. It is 330 metres tall.")
    exact, fast = smollm2.logits(ids), native.logits(ids)
    lp, lq = torch.log_softmax(exact.double(), -1), torch.log_softmax(fast.double(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    print(f"SmolLM2-135M Q4_1: max logit error {rel_err(fast, exact):.2e} of max |logit|, "
          f"KLD mean {float(kld.mean()):.2e} max {float(kld.max()):.2e}")
    # observed: 7e-4 of max |logit|, KLD mean 4e-7 (the bf16 fallback: 6e-4, llama.cpp 2.2e-3)
    assert rel_err(fast, exact) <= 4e-3 and float(kld.mean()) <= 1e-5


def test_without_the_extension_the_torch_ops_serve(smollm2_path, monkeypatch):
    from smollm3_triton import Runtime
    from smollm3_triton.backends import get_backend
    monkeypatch.setattr(cpu_native, "AVAILABLE", False)
    backend = get_backend("cpu", torch.device("cpu"), torch.float32)
    assert backend.prepare_matrix is cpu_fast.prepare and backend.step_runner is None
    rt = Runtime.load(smollm2_path, device="cpu", backend="cpu", max_seq_len=64)
    assert isinstance(rt.model.weights.layers[0].qkv, cpu_fast.CpuWeight)
    assert rt.engine.runner.forward == rt.model.forward
    monkeypatch.undo()
    assert get_backend("cpu", torch.device("cpu"), torch.bfloat16).prepare_matrix is cpu_fast.prepare


@pytest.mark.parametrize("given, expected", [(None, "1000"), ("5", "5")])
def test_import_bounds_libgomp_spin_unless_the_user_set_it(given, expected):
    """A fresh process: importing the package (before torch) sets GOMP_SPINCOUNT where the
    user has not, and leaves a user's value alone."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run([sys.executable, "-c", "import os, smollm3_triton; print(os.environ['GOMP_SPINCOUNT'])"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
