"""Every variant of the attention and rms_stats kernels compiles to a cubin for sm_80 and sm_90
on a machine without a GPU (triton.compile with a GPUTarget), on the triton this environment
resolves and on triton 3.6 (SMOLLM3_TRITON36, as tests/test_compile_qmatmul.py). RoPE and the
KV write are the QKV matmul's epilogue now (compiled there).

Each compile prints registers per thread, spill bytes (ptxas -v) and shared memory; the
test fails on spills or on shared memory past the architecture's per-block limit, or when
decode attention built for programmatic dependent launch (sm_90) touches global memory
before its griddepcontrol.wait (kernels/pdl.py).
Run with -s to see the table.

The compiles run in one subprocess started with TRITON_INTERPRET=0: @triton.jit picks
interpreter or compiler when it decorates, and that includes triton.language's own jit
functions (tl.sum, tl.max, tl.cdiv). Once the package has switched the interpreter on
for the CPU tests, a compile in the same process would call interpreted library code.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton

from smollm3_triton.kernels import attention as attention_mod
from smollm3_triton.kernels import pdl as pdl_mod
from smollm3_triton.kernels import rms_norm as rms_mod

# Triton's wheels ship ptxas (and, for newer PTX, ptxas-blackwell); the PTX it emits for
# an arch may need either.
PTXAS = [p for p in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / n
                     for n in ("ptxas", "ptxas-blackwell")) if p.exists()]
# Largest dynamic shared memory one block may use (CUDA programming guide, compute
# capability table): A100 163 KiB, H100/H200 227 KiB.
MAX_SHARED = {80: 166912, 90: 232448}


TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Variant:
    label: str
    module: str
    kernel: str
    pointers: dict            # arg -> element type
    constexprs: dict
    options: dict
    floats: tuple = ("qk_scale", "eps")

    @property
    def key(self) -> str:
        return self.label.replace(" ", "-")

    def source(self, fn):
        from triton.compiler import ASTSource

        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in self.constexprs:
                signature[name] = "constexpr"
            elif name in self.pointers:
                signature[name] = "*" + self.pointers[name]
                attrs[(i,)] = [["tt.divisibility", 16]]     # torch allocations are 16-byte aligned
            elif name in self.floats:
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                # Row strides of [.., 64 or 128] tensors are multiples of 16, as the JIT
                # would specialise them at run time.
                if name.startswith("stride"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn, signature=signature, constexprs=self.constexprs, attrs=attrs)


def rms_variants(arch):
    out = []
    for dtype, n in [(torch.bfloat16, 2048), (torch.float32, 576)]:
        block = triton.next_power_of_2(n)
        t = TL[dtype]
        out.append(Variant(f"rms_stats {t} N={n}", "rms_norm", "_rms_stats_kernel", dict(h_ptr=t, inv_ptr="fp32"),
                           dict(BLOCK_N=block), dict(num_warps=max(1, min(16, block // 256)))))
    return out


# Pointers of the batch description, shared by the attention kernels.
BATCH_PTRS = dict(qs_ptr="i32", lens_ptr="i32", bt_ptr="i32")


def attention_variants(arch):
    out = []
    # (head_dim, group, dtype, block_size): SmolLM3-3B (group 4), SmolLM2-135M (3), -360M (5), MHA (1).
    for d, group, dtype, bs in [(128, 4, torch.bfloat16, 16), (64, 3, torch.bfloat16, 16),
                                (64, 5, torch.bfloat16, 32), (128, 1, torch.bfloat16, 16),
                                (128, 4, torch.float16, 16), (128, 4, torch.float32, 16),
                                (64, 3, torch.float32, 32)]:
        cfg = attention_mod._prefill_config(d, dtype, arch)
        block_q = attention_mod._prefill_block_q(cfg["BLOCK_M"], group)
        t = TL[dtype]
        out.append(Variant(
            f"attn_prefill {t} d{d} group={group} bs{bs} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}", "attention",
            "_attn_prefill_kernel",
            dict(q_ptr=t, k_ptr=t, v_ptr=t, o_ptr=t, **BATCH_PTRS),
            dict(GROUP=group, HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_Q=block_q, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], DOT_F32=dtype == torch.float32),
            dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    for d, group, dtype, bs in [(128, 4, torch.bfloat16, 16), (64, 3, torch.bfloat16, 16),
                                (64, 5, torch.bfloat16, 32), (128, 1, torch.bfloat16, 16),
                                (128, 4, torch.float32, 16), (64, 3, torch.float32, 32)]:
        cfg = attention_mod._decode_config(d, dtype, arch)
        rows = attention_mod._decode_block_m(group)
        t = TL[dtype]
        out.append(Variant(
            f"attn_decode {t} d{d} group={group} bs{bs} rows={rows} N={cfg['BLOCK_N']}", "attention",
            "_attn_decode_kernel",
            dict(q_ptr=t, k_ptr=t, v_ptr=t, part_o_ptr="fp32", part_lse_ptr="fp32", o_ptr=t, count_ptr="i32",
                 **BATCH_PTRS),
            dict(GROUP=group, HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_M=rows, BLOCK_N=cfg["BLOCK_N"],
                 DOT_F32=dtype == torch.float32, MIN_BLOCKS=attention_mod._MIN_SPLIT_BLOCKS,
                 PDL=arch >= pdl_mod.PDL_ARCH),
            dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return out


CASES = [(v, arch) for arch in (80, 90) for v in rms_variants(arch) + attention_variants(arch)]


def ptxas_usage(ptx: str, workdir: Path) -> tuple[int, int]:
    """(registers, spill store + load bytes) as ptxas -v reports for this PTX."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    errors = []
    for ptxas in PTXAS:
        proc = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(src), "-o", str(workdir / "kernel.cubin")],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            break
        errors.append(proc.stderr.strip())
    else:
        raise AssertionError(f"no ptxas accepts this PTX: {errors}")
    log = proc.stderr + proc.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def compile_all() -> dict:
    """Runs in the TRITON_INTERPRET=0 subprocess: {case id: usage or error}."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from tests.helpers import kernel_compile

    assert isinstance(attention_mod._attn_prefill_kernel, JITFunction), "kernels were decorated for the interpreter"
    modules = {"attention": attention_mod, "rms_norm": rms_mod}
    results = {}
    for variant, arch in CASES:
        fn = getattr(modules[variant.module], variant.kernel)
        try:
            compiled = triton.compile(variant.source(fn), target=GPUTarget("cuda", arch, 32), options=variant.options)
            assert compiled.asm["cubin"], "no cubin"
            regs, spills = ptxas_usage(compiled.asm["ptx"], Path(tempfile.mkdtemp()))
            results[f"sm{arch}-{variant.key}"] = dict(regs=regs, spills=spills, shared=compiled.metadata.shared,
                                                      pdl_wait_first=kernel_compile.pdl_wait_first(compiled.asm["ptx"]))
        except Exception as e:                       # reported by the test of that case
            results[f"sm{arch}-{variant.key}"] = dict(error=f"{type(e).__name__}: {e}")
    return results


def _run_child(pythonpath: str | None) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, repo, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["resolved", "3.6"])
def compiled(request):
    if request.param == "resolved":
        return _run_child(None)
    path = os.environ.get("SMOLLM3_TRITON36")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("SMOLLM3_TRITON36 is not set under CI: .ci/run installs triton 3.6 and sets it")
        pytest.skip("SMOLLM3_TRITON36 is not set: no triton 3.6 to compile with (.ci/run sets it)")
    if not (Path(path) / "triton" / "__init__.py").exists():
        pytest.fail(f"SMOLLM3_TRITON36={path} holds no triton package")
    results = _run_child(path)
    assert results.pop("triton").startswith("3.6")
    return results


@pytest.mark.skipif(not PTXAS, reason="this triton wheel ships no ptxas")
@pytest.mark.parametrize("variant,arch", CASES, ids=[f"sm{a}-{v.key}" for v, a in CASES])
def test_compiles(compiled, variant, arch):
    usage = compiled[f"sm{arch}-{variant.key}"]
    assert "error" not in usage, usage.get("error")
    print(f"\nsm_{arch} {variant.label:58s} warps={variant.options.get('num_warps', 4)} "
          f"stages={variant.options.get('num_stages', '-')} regs={usage['regs']:3d} "
          f"spill_bytes={usage['spills']} shared={usage['shared']}")
    assert usage["spills"] == 0, f"{variant.label} spills {usage['spills']} bytes on sm_{arch}"
    # Decode attention is launched with programmatic dependent launch on sm_90 (kernels/pdl.py):
    # it must wait for the kernel before it ahead of any global memory access.
    assert usage["pdl_wait_first"] is (True if variant.constexprs.get("PDL") else None), usage["pdl_wait_first"]
    assert usage["shared"] <= MAX_SHARED[arch], \
        f"{variant.label} needs {usage['shared']} B shared memory, sm_{arch} has {MAX_SHARED[arch]}"


if __name__ == "__main__":
    results = compile_all()
    results["triton"] = triton.__version__
    print(json.dumps(results))
