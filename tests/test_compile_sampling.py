"""kernels/sampling.py's kernel compiles to a cubin for sm_90 (H100 / H200) on a machine
without a GPU (triton.compile with a GPUTarget), at the cap the engine runs (2048
candidates sorted in registers) and 8 warps, within the block's shared memory. Registers
and spill bytes (ptxas -v) are printed (-s): the kernel streams a row per program, so a
few spilled bytes outside its loops are reported, not refused.

As in tests/test_compile_attention.py, the compile runs in a subprocess started with
TRITON_INTERPRET=0: this process decorated the kernels for the interpreter.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from smollm3_triton.kernels import sampling

PTXAS = [p for p in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / n
                     for n in ("ptxas", "ptxas-blackwell")) if p.exists()]
MAX_SHARED_SM90 = 232448        # H100/H200: 227 KiB of dynamic shared memory per block
POINTERS = dict(logits_ptr="fp32", lrows_ptr="i64", rows_ptr="i64", out_ptr="i64", st_t="fp64", st_k="i64",
                st_p="fp32", st_minp="fp32", st_pen="fp32", st_penalized="i8", st_keys="i64", st_steps="i64",
                st_history="i16", st_masked="i8", st_bitmask="i32", st_last="i64", st_scratch="i64")


def compile_sm90() -> dict:
    """Runs in the TRITON_INTERPRET=0 subprocess."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = sampling._sample_kernel
    constexprs = dict(CAP=sampling.CAP, BLOCK=sampling.BLOCK_V, NB=sampling._NB)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    return dict(ptx=compiled.asm["ptx"], cubin=bool(compiled.asm["cubin"]), shared=compiled.metadata.shared)


@pytest.mark.skipif(not PTXAS, reason="this triton wheel ships no ptxas")
def test_sampling_kernel_compiles_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cubin"] and result["shared"] <= MAX_SHARED_SM90, result["shared"]
    src = tmp_path / "sample.ptx"
    src.write_text(result["ptx"])
    logs = [subprocess.run([str(p), "-v", "--gpu-name=sm_90a", str(src), "-o", str(tmp_path / "k.cubin")],
                           capture_output=True, text=True) for p in PTXAS]
    ok = [p.stderr + p.stdout for p in logs if p.returncode == 0]
    assert ok, f"no ptxas accepts this PTX: {[p.stderr.strip() for p in logs]}"
    log = ok[0]
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    print(f"\nsm_90 _sample_kernel CAP={sampling.CAP} warps=8 regs={regs} spill_bytes={spills} "
          f"shared={result['shared']}")


if __name__ == "__main__":
    print(json.dumps(compile_sm90()))
