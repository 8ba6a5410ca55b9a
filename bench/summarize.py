"""The bench table for bench/README.md from bench_e2e.json (bench/test_bench_e2e_gpu.py).

    python bench/summarize.py RESULTS/bench_e2e.json > table.md

Per type: decode tok/s (CUDA graph, greedy) at each context with its fraction of the
bandwidth roofline (vendor peak) and GB/s; prefill tok/s at each length with its
fraction of the compute roofline; speedup over the eager torch reference measured in
the same run. Only measured figures appear; a case that did not run shows "-".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def table(data: dict) -> str:
    runs = data["runs"]
    device = data.get("machine", {}).get("device", {})
    by = {(r["model"], r["kind"], r["engine"], r["length"]): r for r in runs}
    models = list(dict.fromkeys(r["model"] for r in runs))
    contexts = sorted({r["length"] for r in runs if r["kind"] == "decode" and r["engine"] == "graph"})
    lengths = sorted({r["length"] for r in runs if r["kind"] == "prefill" and r["engine"] == "triton"})

    def cell(model, kind, engine, length, ref_engine):
        r = by.get((model, kind, engine, length))
        if r is None:
            return "-"
        text = f"{r['tok_per_s']:,.0f}"
        if r.get("fraction_of_roofline") is not None:
            text += f" ({100 * r['fraction_of_roofline']:.0f}%"
            text += f", {r['gb_per_s']:,.0f} GB/s)" if r.get("gb_per_s") else ")"
        ref = by.get((model, kind, ref_engine, length))
        if ref:
            text += f", x{r['tok_per_s'] / ref['tok_per_s']:.1f} vs eager"
        return text

    head = ["model"] + [f"decode ctx {c}" for c in contexts] + [f"prefill {n}" for n in lengths]
    lines = [f"Device: {device.get('name', '?')} (peak {device.get('peak_gbps', '?')} GB/s, measured copy "
             f"{device.get('copy_gbps') or 0:.0f} GB/s, {device.get('peak_tflops', '?')} TFLOP/s bf16). "
             f"tok/s (fraction of roofline, GB/s), speedup over the eager torch reference.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for model in models:
        row = [model] + [cell(model, "decode", "graph", c, "torch-eager") for c in contexts] + \
            [cell(model, "prefill", "triton", n, "torch-eager") for n in lengths]
        lines.append("| " + " | ".join(row) + " |")
    extra = [r for r in runs if r["engine"] in ("graph+top-p", "triton-eager", "generate-loop")]
    if extra:
        lines += ["", "| model | case | ctx | tok/s |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['engine']} | {r['length']} | {r['tok_per_s']:,.0f} |" for r in extra]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(table(json.loads(Path(argv[0]).read_text())))


if __name__ == "__main__":
    main()
