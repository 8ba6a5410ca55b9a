"""Compile a recorded Triton launch for an NVIDIA target without a GPU, and read the result.

- `compile_launch(launch, arch)`: `triton.compile(ASTSource(...), target=GPUTarget("cuda",
  arch, 32))` with the signature, constexprs and 16-divisibility hints that triton's own
  launcher would derive from the recorded arguments (triton's `native_specialize_impl`).
- `ptxas_stats`: registers and spill bytes from `ptxas -v` on the PTX (the ptxas triton
  bundles); shared memory comes from the kernel's metadata.
- `sass` + `loops`: the cubin disassembled by the bundled `cuobjdump -sass`; a loop is the
  block between a backward branch and its target. `LoopStats` counts its instructions:
  all of them, global loads by width, barriers (BAR.SYNC), shared-memory traffic,
  tensor-core and conversion instructions.
- `occupancy`: CTAs per SM from registers, shared memory and warps (sm_80 / sm_90 limits).

Compiling needs TRITON_INTERPRET=0 when the kernel modules are first imported.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

# Per-SM limits: registers, shared memory per SM (bytes) and per block, warps, CTAs.
SM_LIMITS = {80: dict(regs=65536, smem_sm=167936, smem_block=166912, warps=64, ctas=32),
             90: dict(regs=65536, smem_sm=233472, smem_block=232448, warps=64, ctas=32)}


def specialize(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, as triton's launcher specialises `args`
    (tuple arguments give tuple signatures and per-element attributes)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    sig, consts, attrs = {}, {}, {}

    def walk(path: tuple, kind, spec):
        if isinstance(kind, tuple):
            for j, (k, sp) in enumerate(zip(kind, spec)):
                walk(path + (j,), k, sp)
        elif kind == "constexpr":
            consts[path] = spec
        elif spec == "D":
            attrs[path] = [["tt.divisibility", 16]]

    for i, p in enumerate(fn.params):
        value = args[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, not p.do_not_specialize, True)
        sig[p.name] = kind
        if kind == "constexpr":
            consts[p.name] = spec
        else:
            walk((i,), kind, spec)
    return sig, consts, attrs


def compile_kernel(fn, sig: dict, consts: dict, attrs: dict, arch: int, num_warps: int, num_stages: int,
                   enable_fp_fusion: bool | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": num_warps, "num_stages": num_stages}
    if enable_fp_fusion is not None:
        options["enable_fp_fusion"] = enable_fp_fusion
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def compile_launch(launch, arch: int):
    from smollm3_triton.kernels.pdl import PDL_ARCH

    sig, consts, attrs = specialize(launch.fn, launch.args)
    if arch < PDL_ARCH and consts.get("PDL"):
        consts["PDL"] = False       # what the launcher picks on a GPU without griddepcontrol
    return compile_kernel(launch.fn, sig, consts, attrs, arch, launch.num_warps, launch.num_stages,
                          launch.enable_fp_fusion)


_GLOBAL_ACCESS = re.compile(r"\b(?:ld|st|atom|red)\.global|\bcp\.async")


def pdl_wait_first(ptx: str) -> bool | None:
    """None when the kernel has no griddepcontrol.wait (no programmatic dependent launch);
    else whether the wait comes before the kernel's first global memory access, which a
    kernel launched with PDL must keep (kernels/pdl.py)."""
    body = ptx[ptx.index(".entry"):]
    wait = body.find("griddepcontrol.wait")
    if wait < 0:
        return None
    first = _GLOBAL_ACCESS.search(body)
    return first is None or wait < first.start()


def _tool(name: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return os.path.join(os.path.dirname(get_ptxas(arch).path), name)


def ptxas_stats(ptx: str, arch: int) -> dict:
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


def sass(cubin: bytes, arch: int) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([_tool("cuobjdump", arch), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\b[^0-9]*0x([0-9a-f]+)")


def instructions(sass_text: str) -> list[tuple[int, str]]:
    """(address, text) of every instruction."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in _LINE.finditer(sass_text)]


def opcode(text: str) -> str:
    """'@!P0 LDG.E.128 R4, desc[...]' -> 'LDG.E.128'."""
    words = text.split()
    return words[1] if words[0].startswith("@") else words[0]


@dataclass
class LoopStats:
    start: int
    end: int
    ops: Counter             # full opcode -> count
    total: int               # instructions, NOPs excluded

    def count(self, prefix: str) -> int:
        return sum(n for op, n in self.ops.items() if op == prefix or op.startswith(prefix + "."))

    @property
    def barriers(self) -> int:
        return self.count("BAR")

    @property
    def global_load_bytes_per_thread(self) -> int:
        """Bytes one thread requests per iteration through LDG and LDGSTS (cp.async)."""
        total = 0
        for op, n in self.ops.items():
            if op.startswith(("LDG.", "LDGSTS.")) or op in ("LDG", "LDGSTS"):
                width = re.search(r"\.(128|64|U8|S8|U16|S16)\b", op)
                size = {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}.get(width.group(1)) if width else 4
                total += n * size
        return total

    def summary(self) -> dict:
        return dict(instructions=self.total, barriers=self.barriers, ldg=self.count("LDG"),
                    ldg128=sum(n for op, n in self.ops.items() if op.startswith("LDG.") and ".128" in op),
                    ldgsts=self.count("LDGSTS"), sts=self.count("STS"), lds=self.count("LDS") + self.count("LDSM"),
                    shfl=self.count("SHFL"), mma=self.count("HMMA") + self.count("HGMMA") + self.count("IMMA"),
                    i2f=self.count("I2F"), f2f=self.count("F2F") + self.count("F2FP"),
                    ffma=self.count("FFMA"), prmt=self.count("PRMT"), lop3=self.count("LOP3"))


def loops(sass_text: str) -> list[LoopStats]:
    """Every block between a backward branch and its target, innermost first."""
    ins = instructions(sass_text)
    found = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            lo, hi = int(m.group(1), 16), addr
            body = [t for a, t in ins if lo <= a <= hi and not opcode(t).startswith("NOP")]
            found.append(LoopStats(lo, hi, Counter(opcode(t) for t in body), len(body)))
    return sorted(found, key=lambda s: s.end - s.start)


def main_loop(sass_text: str) -> LoopStats | None:
    """A matmul's main loop: the loop with the most tensor-core instructions, or, in a kernel
    without them, the one that loads the most from global memory per iteration."""
    found = loops(sass_text)
    with_mma = [s for s in found if s.summary()["mma"]]
    if with_mma:
        return max(with_mma, key=lambda s: (s.summary()["mma"], s.total))
    candidates = [s for s in found if s.global_load_bytes_per_thread]
    return max(candidates, key=lambda s: (s.global_load_bytes_per_thread, s.total), default=None)


def tile_loops(sass_text: str) -> list[LoopStats]:
    """The loops holding tensor-core instructions that no other such loop contains, in code order:
    a matmul's loop over weight tiles (one per part of a two-part weight) or over x chunks."""
    with_mma = [s for s in loops(sass_text) if s.summary()["mma"]]
    return sorted((s for s in with_mma
                   if not any(o is not s and o.start <= s.start and s.end <= o.end for o in with_mma)),
                  key=lambda s: s.start)


def finishing(sass_text: str) -> tuple[int, int] | None:
    """(instructions, of which inside loops) of a split-K decode kernel's finishing epilogue, or
    None: the code after its first counter atomic (ATOMG.E.ADD) that a program runs only when it
    is the last of a unit's slices, i.e. what the first conditional branch after the atomic
    skips: up to a forward BRA's target, or to the kernel's end after an EXIT."""
    ins = [(a, t) for a, t in instructions(sass_text) if not opcode(t).startswith("NOP")]
    first = next((i for i, (_, t) in enumerate(ins) if opcode(t).startswith("ATOMG.E.ADD")), None)
    if first is None:
        return None
    for i in range(first + 1, len(ins)):
        addr, text = ins[i]
        if not text.startswith("@"):
            continue
        if opcode(text) == "EXIT":
            end = ins[-1][0] + 1
        elif opcode(text) == "BRA" and int(_BRANCH.search(text).group(1), 16) > addr:
            end = int(_BRANCH.search(text).group(1), 16)
        else:
            continue
        body = [(a, t) for a, t in ins[i + 1:] if a < end]
        inner = [s for s in loops(sass_text) if addr < s.start and s.end < end]
        # a loop nested in another is part of the outer one's count
        outer = [s for s in inner if not any(o is not s and o.start <= s.start and s.end <= o.end for o in inner)]
        return len(body), sum(s.total for s in outer)
    return None


def whole_kernel(sass_text: str) -> LoopStats:
    ins = instructions(sass_text)
    body = [t for _, t in ins if not opcode(t).startswith("NOP")]
    return LoopStats(ins[0][0], ins[-1][0], Counter(opcode(t) for t in body), len(body))


def occupancy(regs: int, smem: int, warps: int, arch: int) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256 (8 per thread)."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * warps)
    by_smem = lim["smem_sm"] // smem if smem else lim["ctas"]
    by_warps = lim["warps"] // warps
    return max(0, min(by_regs, by_smem, by_warps, lim["ctas"]))
