"""Static performance report of the Triton decode path: compiled code read without a GPU.

    python -m bench.static_report [--quant q4_k_m,q8_0,f16] [--batch 1,64] [--context 1024]
                                  [--arch 90,80] [--markdown]

With triton 3.6 (the GPU machines' version) put its install first on PYTHONPATH
(`pip install --target DIR triton==3.6.0`; PYTHONPATH=DIR).

1. Builds a SmolLM3-3B-shaped model (exact matrix shapes and per-tensor GGUF types of the
   quant's file, random weights: tests/helpers/decode_trace.py) and records every kernel a
   pure decode step of B sequences launches (Triton launches with their grids and
   constexprs; torch ops that would be kernels), with the grids an H200 would get.
2. Compiles each distinct Triton variant for sm_90 (and sm_80): registers, spills, shared
   memory, CTAs per SM, CTAs per launch; for matmul kernels the main loop read from the
   SASS (tests/helpers/kernel_compile.py): instructions per iteration, weight bytes per
   warp-instruction, barriers per iteration.
3. Estimates the step time on an H200 from those figures (bench/decode_estimate.py, whose
   assumptions are printed beside the result). An ESTIMATE, not a measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
if os.environ["TRITON_INTERPRET"] != "0":
    sys.exit("bench.static_report compiles kernels: run it with TRITON_INTERPRET=0 (or unset)")

from bench.decode_estimate import ASSUMPTIONS, H200_SPEC, estimate_launch, estimate_torch_op, matmul_role  # noqa: E402
from tests.helpers import decode_trace, kernel_compile  # noqa: E402


def _variant_key(launch) -> tuple:
    sig, consts, _ = kernel_compile.specialize(launch.fn, launch.args)
    return (launch.name, tuple(sorted((k, str(v)) for k, v in consts.items())),
            tuple(sorted(sig.items())), launch.num_warps, launch.num_stages)


def compile_stats(launch, arch: int) -> dict:
    """Registers, spills, shared memory, occupancy and the main loop of one launch's variant.
    A decode matmul whose programs take one unit each is compiled without a loop (triton
    specialises the count 1); its per-tile loop is read from the variant taking two. A streamed
    slice (GROUPS > SUB) has its loop over x chunks whatever the count."""
    start = time.perf_counter()
    k = kernel_compile.compile_launch(launch, arch)
    text = kernel_compile.sass(k.asm["cubin"], arch)
    stats = kernel_compile.ptxas_stats(k.asm["ptx"], arch)
    stats.update(shared=k.metadata.shared, occupancy=kernel_compile.occupancy(stats["regs"], k.metadata.shared,
                                                                           launch.num_warps, arch))
    stats["kernel_instructions"] = kernel_compile.whole_kernel(text).total
    stats["finish"] = kernel_compile.finishing(text) if launch.name == "_qmv_kernel" else None
    consts = launch.constexprs()
    # A two-part weight (QKV of a Q4_K_M file) has a tile loop per part; a program runs its own.
    two_part = launch.name == "_qmv_kernel" and consts["QTYPE_B"] is not None and consts["EPILOGUE"] != 1
    # The loops of this compile the estimate counts with their trips, to take out of the code a
    # program runs once (none where this compile unrolled a single trip).
    here = kernel_compile.tile_loops(text) if two_part else [s for s in [kernel_compile.main_loop(text)] if s]
    stats["tile_loops_here"] = sum(s.total for s in here)
    if launch.name == "_qmv_kernel" and launch.args["units_per_program"] == 1 and consts["GROUPS"] == consts["SUB"]:
        looped = dataclasses.replace(launch, args=dict(launch.args, units_per_program=2))
        text = kernel_compile.sass(kernel_compile.compile_launch(looped, arch).asm["cubin"], arch)
    loop = kernel_compile.main_loop(text)
    stats["loop"] = loop.summary() if loop else None
    # a two-part weight's loops, one per part, in code order (part A's first)
    stats["part_loops"] = [s.total for s in kernel_compile.tile_loops(text)] if two_part else []
    stats["seconds"] = round(time.perf_counter() - start, 1)
    return stats


def report(quant: str, batch: int, context: int, archs: list[int], model, cache: dict) -> dict:
    step = decode_trace.decode_batch(model, batch, context)
    tr = decode_trace.trace(lambda: model.forward(step))
    rows, total = [], dict(launches=len(tr.launches), torch_ops=len(tr.torch_ops), bytes=0.0, bw_s=0.0,
                           issue_s=0.0, launch_s=0.0, time_s=0.0)
    for launch in tr.launches:
        key = _variant_key(launch)
        for arch in archs:
            if (key, arch) not in cache:
                cache[(key, arch)] = compile_stats(launch, arch)
        est = estimate_launch(launch, cache[(key, archs[0])], model, context)
        rows.append(dict(launch=launch, key=key, est=est, role=matmul_role(launch, model)))
    for op, out_bytes in zip(tr.torch_ops, tr.torch_out_bytes):
        rows.append(dict(launch=None, key=("torch." + op,), est=estimate_torch_op(out_bytes), role=""))
    for r in rows:
        for k in ("bytes", "bw_s", "issue_s", "launch_s", "time_s"):
            total[k] += r["est"][k]
    total["tok_s"] = batch / total["time_s"]
    return dict(quant=quant, batch=batch, context=context, rows=rows, total=total, host_reads=tr.host_reads)


# ----------------------------------------------------------------------------- printing

def _fmt_loop(loop: dict | None, bpi: float | None) -> str:
    if not loop:
        return "| | | | |"
    b = f"{bpi:.2f}" if bpi else ""
    return (f"| {loop['instructions']} | {b} | {loop['barriers']} | {loop['ldg128']}/{loop['ldg'] - loop['ldg128']}"
            f"+{loop['ldgsts']} | {loop['sts']}/{loop['lds']} | {loop['mma']} |")


def print_variants(results: list[dict], archs: list[int], cache: dict) -> None:
    print("\n### Kernel variants (one row per distinct compiled variant and role; sm_" +
          "/".join(map(str, archs)) + ")\n")
    print("| kernel | role | types | sm | regs | spills | smem B | CTAs/SM | CTAs/launch | waves (CTAs/132) "
          "| loop instr | weight B/warp-instr | BAR/iter | LDG.128/other+LDGSTS | STS/LDS | MMA |")
    print("|" + " --- |" * 16)
    seen = set()
    for res in results:
        for r in res["rows"]:
            launch = r["launch"]
            if launch is None or (r["key"], r["role"], res["batch"]) in seen:
                continue
            seen.add((r["key"], r["role"], res["batch"]))
            for arch in archs:
                s = cache[(r["key"], arch)]
                bpi = r["est"].get("bytes_per_warp_instr") if arch == archs[0] else None
                types = r["est"].get("types", "")
                print(f"| {launch.name} M={res['batch']} | {r['role']} | {types} | {arch} | {s['regs']} | "
                      f"{s['spill_stores']} | {s['shared']} | {s['occupancy']} | {launch.ctas} | "
                      f"{launch.ctas / 132:.2f} " + _fmt_loop(s["loop"], bpi))


def print_steps(results: list[dict]) -> None:
    print("\n### Estimated decode step on an H200 (ESTIMATE from the compiled code, not a measurement)\n")
    print("| quant | batch | context | kernels (Triton + torch) | MB moved | bandwidth us | issue us "
          "| launch us | step us | tok/s (all sequences) |")
    print("|" + " --- |" * 10)
    for res in results:
        t = res["total"]
        print(f"| {res['quant']} | {res['batch']} | {res['context']} | {t['launches'] + t['torch_ops']} "
              f"({t['launches']} + {t['torch_ops']}) | {t['bytes'] / 1e6:.0f} | {t['bw_s'] * 1e6:.0f} | "
              f"{t['issue_s'] * 1e6:.0f} | {t['launch_s'] * 1e6:.0f} | {t['time_s'] * 1e6:.0f} | "
              f"{t['tok_s']:,.0f} |")
    print("\nReference points (docs/PERFORMANCE.md): llama.cpp ~310 tok/s at batch 1 on an H200 "
          "(3B Q4_K_M); roofline ~2,500 tok/s (1.9 GB per token at 4.8 TB/s).")


def print_breakdown(res: dict) -> None:
    """Where a step's time goes, by kernel (summed over its launches)."""
    by: dict[str, dict] = {}
    for r in res["rows"]:
        name = r["launch"].name if r["launch"] else r["key"][0]
        if r["role"]:
            name += f" ({r['role']})"
        b = by.setdefault(name, dict(n=0, bytes=0.0, bw_s=0.0, issue_s=0.0, time_s=0.0))
        b["n"] += 1
        for k in ("bytes", "bw_s", "issue_s", "time_s"):
            b[k] += r["est"][k]
    print(f"\n#### {res['quant']}, batch {res['batch']}, context {res['context']}: time by kernel\n")
    print("| kernel (role) | launches | MB | bandwidth us | issue us | est. us incl. launch |")
    print("|" + " --- |" * 6)
    for name, b in sorted(by.items(), key=lambda kv: -kv[1]["time_s"]):
        print(f"| {name} | {b['n']} | {b['bytes'] / 1e6:.1f} | {b['bw_s'] * 1e6:.1f} | {b['issue_s'] * 1e6:.1f} "
              f"| {b['time_s'] * 1e6:.1f} |")


def main(argv=None) -> None:
    import triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", default="q4_k_m,q8_0,f16")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--arch", default="90,80")
    ap.add_argument("--breakdown", action="store_true", help="time by kernel for each step")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    print(f"triton {triton.__version__}; SmolLM3-3B shapes; decode steps at context {args.context}; "
          f"device model {H200_SPEC['name']}")
    cache: dict = {}
    results = []
    for quant in args.quant.split(","):
        model = decode_trace.model_like("smollm3-3b", quant)
        for batch in (int(b) for b in args.batch.split(",")):
            results.append(report(quant, batch, args.context, archs, model, cache))
        del model
    print_variants(results, archs, cache)
    print_steps(results)
    if args.breakdown:
        for res in results:
            print_breakdown(res)
    print("\nAssumptions of the estimate:")
    for line in ASSUMPTIONS:
        print(f"- {line}")


if __name__ == "__main__":
    main()
