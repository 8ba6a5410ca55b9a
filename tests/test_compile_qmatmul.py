"""Every qmatmul / gate_up_swiglu kernel variant compiles for sm_80 and sm_90, without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs the whole
pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas, which ships with triton) on the CPU.
It runs in a child process with TRITON_INTERPRET=0: in this process the kernels may
already be interpreted functions (smollm3_triton.kernels selects the interpreter when
there is no GPU, and @triton.jit decides when it decorates).

Variants: the constexprs the launchers actually use. By default every weight type
on the decode GEMV (one row) and the prefill tile (128 x 128, bf16); on Q4_K, Q6_K
and Q8_0 also the 4-row GEMV, the 16- and 64-row tiles, split-K (fp32 partials) and
fp32 activations; and the fused gate+up+SwiGLU kernels on the pairs Q4_K_M files hold.
QMATMUL_COMPILE_ALL=1 compiles the cross product (every type and pair with every
variant, fp16 too): ~5x the default's compile time. Registers and spills come from ptxas -v on the
generated PTX (the same ptxas triton used), shared memory from the kernel's metadata.
Run with -s to see the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)
ALL_TYPES = ("Q4_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q5_K", "F16", "BF16", "F32")
PRIORITY = ("Q4_K", "Q6_K", "Q8_0")
# Per compile, cold (triton's cache empty), on one shared core: a blow-up past this is a bug.
MAX_SECONDS_PER_COMPILE = 60


def variants(full: bool) -> list[dict]:
    """Kernel, weight type(s), constexprs, pointer dtypes, warps and stages, as the launchers pick them."""
    import torch

    from smollm3_triton.gguf.constants import GGMLType
    from smollm3_triton.kernels.qmatmul import gemm_config, gemv_config, sub_block
    from smollm3_triton.kernels.swiglu import swiglu_gemm_config

    out = []

    def gemv(t, m, xd, split=False):
        cfg, sub = gemv_config(m), sub_block(GGMLType[t])
        out.append(dict(kernel="qgemv", types=(t,), x=xd, y="fp32" if split else xd, warps=cfg.num_warps,
                        stages=cfg.num_stages, consts=dict(QTYPE=int(GGMLType[t]), BLOCK_M=m, BLOCK_N=cfg.block_n,
                                                           SUB=sub, NSUB=cfg.block_k // sub)))

    def gemm(t, m, xd, split=False):
        cfg = gemm_config(m, torch.float32 if xd == "fp32" else torch.bfloat16)
        out.append(dict(kernel="qgemm", types=(t,), x=xd, y="fp32" if split else xd, warps=cfg.num_warps,
                        stages=cfg.num_stages, consts=dict(QTYPE=int(GGMLType[t]), SUB=sub_block(GGMLType[t]),
                                                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                                           BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)))

    def gate_up(tg, tu, m, xd):
        sg, su = sub_block(GGMLType[tg]), sub_block(GGMLType[tu])
        types = dict(QTYPE_G=int(GGMLType[tg]), QTYPE_U=int(GGMLType[tu]), SUB_G=sg, SUB_U=su)
        if m <= 4:
            cfg = gemv_config(m)
            consts = dict(types, BLOCK_M=m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
            kernel = "gate_up_gemv"
        else:
            cfg = swiglu_gemm_config(m, torch.float32 if xd == "fp32" else torch.bfloat16)
            consts = dict(types, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
            kernel = "gate_up_gemm"
        out.append(dict(kernel=kernel, types=(tg, tu), x=xd, y=xd, warps=cfg.num_warps, stages=cfg.num_stages,
                        consts=consts))

    # M picks the variant: 1 and 2..4 (GEMV row blocks), 16 / 64 / 512 (the three bf16 tiles);
    # split-K writes fp32 partials (decode GEMV and the 16-row tile, where it applies).
    for t in ALL_TYPES:
        gemv(t, 1, "bf16")
        gemm(t, 512, "bf16")
        if full or t in PRIORITY:
            gemv(t, 4, "bf16", split=True)
            gemm(t, 16, "bf16", split=True)
            gemm(t, 64, "bf16")
            gemm(t, 512, "fp32")
        if full:
            gemv(t, 1, "fp32")
            gemv(t, 2, "bf16")
            gemv(t, 1, "bf16", split=True)
            gemv(t, 1, "fp16")
            gemm(t, 512, "fp16")
            gemm(t, 16, "fp32", split=True)
    pairs = [(t, t) for t in ALL_TYPES] + [("Q4_K", "Q6_K"), ("Q6_K", "Q4_K"), ("Q5_0", "Q8_0")] if full else [
        ("Q4_K", "Q4_K"), ("Q4_K", "Q6_K"), ("Q5_0", "Q8_0")]
    for tg, tu in pairs:
        for m in ((1, 4, 16, 64, 512) if full else (1, 4, 16, 512) if tg == tu == "Q4_K" else (1, 512)):
            gate_up(tg, tu, m, "bf16")
    gate_up("Q4_K", "Q6_K", 512, "fp32")
    return out


# ----------------------------------------------------------------------------- child process

_FLOAT_PTR = {"F32": "*fp32", "F16": "*fp16", "BF16": "*bf16"}


def _plane_types(t: str) -> list[str]:
    """Pointer types of the q, qh, s, f planes (kernels/repack.py); absent planes are passed as q."""
    q = _FLOAT_PTR.get(t, "*u8")
    if t in _FLOAT_PTR:
        return [q, q, q, q]
    qh = "*i32" if t in ("Q5_0", "Q5_1", "Q5_K", "Q6_K") else q
    s = {"Q4_K": "*u8", "Q5_K": "*u8", "Q6_K": "*i8"}.get(t, q)
    return [q, qh, s, "*fp16"]


def _signature(fn, v: dict) -> tuple[dict, dict]:
    """Argument types, and the specialisation the launcher's arguments get: 16-byte aligned
    pointers and 16-divisible strides (every plane row is padded to 16 elements)."""
    types = {"x_ptr": f"*{v['x']}", "y_ptr": f"*{v['y']}"}
    names = ("q_ptr", "qh_ptr", "s_ptr", "f_ptr")
    if v["kernel"].startswith("gate_up"):
        for prefix, t in zip("gu", v["types"]):
            types.update({f"{prefix}{n}": p for n, p in zip(names, _plane_types(t))})
    else:
        types.update(dict(zip(names, _plane_types(v["types"][0]))))
    sig, aligned = {}, []
    for name in fn.arg_names:
        if name in v["consts"]:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, "i32")
        if sig[name].startswith("*") or "stride" in name or name == "K":
            aligned.append((fn.arg_names.index(name),))
    return sig, {a: [["tt.divisibility", 16]] for a in aligned}


def _ptxas_report(ptx: str, arch: int) -> dict:
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))


def _compile_one(job: tuple[dict, int]) -> dict:
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from smollm3_triton.kernels import qmatmul, swiglu

    v, arch = job
    fn = {"qgemv": qmatmul._qgemv_kernel, "qgemm": qmatmul._qgemm_kernel,
          "gate_up_gemv": swiglu._gate_up_gemv_kernel, "gate_up_gemm": swiglu._gate_up_gemm_kernel}[v["kernel"]]
    sig, attrs = _signature(fn, v)
    start = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, constexprs=v["consts"], attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": v["warps"], "num_stages": v["stages"]})
    seconds = time.perf_counter() - start
    row = dict(v, arch=arch, seconds=round(seconds, 2), shared=k.metadata.shared,
               cubin_bytes=len(k.asm.get("cubin", b"")), ptx_has_entry=f".entry {fn.__name__}" in k.asm["ptx"])
    row.update(_ptxas_report(k.asm["ptx"], arch))
    return row


def _child(full: bool) -> None:
    import multiprocessing

    jobs = [(v, arch) for v in variants(full) for arch in ARCHS]
    with multiprocessing.get_context("fork").Pool(min(2, os.cpu_count() or 1)) as pool:
        rows = pool.map(_compile_one, jobs, chunksize=1)
    print("RESULTS " + json.dumps(rows))


# ----------------------------------------------------------------------------- the test

def _label(r: dict) -> str:
    c = r["consts"]
    if r["kernel"] in ("qgemv", "gate_up_gemv"):
        shape = f"M{c['BLOCK_M']} N{c['BLOCK_N']}"
    else:
        shape = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
    return f"{r['kernel']:<13}{'/'.join(r['types']):<10}{shape:<14}x {r['x']:<5}y {r['y']:<5}w{r['warps']}"


def test_every_variant_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    full = os.environ.get("QMATMUL_COMPILE_ALL") == "1"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__, "--child", "all" if full else "default"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert len(rows) == len(variants(full)) * len(ARCHS)

    print(f"\n{'variant':<70}{'sm':>4}{'regs':>6}{'spill st/ld':>13}{'smem':>8}{'s':>6}")
    for r in sorted(rows, key=lambda r: (_label(r), r["arch"])):
        print(f"{_label(r):<70}{r['arch']:>4}{r['regs']:>6}{r['spill_stores']:>7}/{r['spill_loads']:<5}"
              f"{r['shared']:>8}{r['seconds']:>6}")
    print(f"{len(rows)} compiles, {sum(r['seconds'] for r in rows):.0f} s of compile time")

    for r in rows:
        assert r["cubin_bytes"] > 0 and r["ptx_has_entry"], _label(r)
        assert r["seconds"] < MAX_SECONDS_PER_COMPILE, f"{_label(r)} sm_{r['arch']}: {r['seconds']} s"
        assert r["regs"] <= 255
        # Each variant must fit on the SM's shared memory (sm_80: 163 KiB, sm_90: 227 KiB per block).
        assert r["shared"] <= (163 if r["arch"] == 80 else 227) * 1024, _label(r)
    # The decode GEMVs (what batch-1 generation runs) must not spill.
    for r in rows:
        if r["kernel"] in ("qgemv", "gate_up_gemv"):
            assert r["spill_stores"] == 0, f"{_label(r)} sm_{r['arch']} spills {r['spill_stores']} bytes"


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2] == "all")
