"""Shared by tests/test_perplexity.py and bench/perplexity_table.py: a deterministic
English-like text (no downloads), real-weight GGUF files in other types, and a runner
for llama.cpp's own llama-perplexity binary.

The text: sentences from a small grammar drawn with a seeded RNG: the same (n_words, seed)
always gives the same text, on every machine and Python version (random.Random is stable)."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess

_SUBJECTS = ["The old miller", "A young doctor", "My neighbour", "The river", "Every student", "The council",
             "Our teacher", "The small boat", "A tired farmer", "The library", "Her brother", "The train",
             "The north wind", "A quiet child", "The market", "The baker on the corner"]
_VERBS = ["walked to", "looked at", "wrote about", "built", "carried", "painted", "remembered", "followed",
          "repaired", "sold", "visited", "described", "found", "opened", "crossed", "watched"]
_OBJECTS = ["the bridge", "a letter", "the garden", "an old map", "the harbour", "the stone wall",
            "a wooden chair", "the long road", "the village school", "a basket of apples", "the church tower",
            "the evening news", "a broken clock", "the winter fields", "the station", "a red door"]
_TAILS = ["before the rain began", "in the morning", "after dinner", "with great care", "for the first time",
          "without a word", "near the old mill", "during the long summer", "while the bells rang",
          "at the end of the week", "in spite of the cold", "as the sun went down"]
_LINKS = ["Then", "Later", "After that", "Meanwhile", "In the end", "Soon", "The next day", "Once again"]


def english_text(n_words: int = 2000, seed: int = 0) -> str:
    rng = random.Random(seed)
    paragraphs, sentences, words = [], [], 0
    while words < n_words:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(_TAILS)}"
        if rng.random() < 0.3:
            s = f"{rng.choice(_LINKS)}, {s[0].lower()}{s[1:]}"
        if rng.random() < 0.15:
            s += f", and it took {rng.randint(2, 40)} minutes"
        sentences.append(s + rng.choice([".", ".", ".", "!", "?"] if rng.random() < 0.1 else ["."]))
        words += len(s.split())
        if len(sentences) >= rng.randint(3, 7):
            paragraphs.append(" ".join(sentences))
            sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


# ---------------------------------------------------------------- real weights, other quants

def smollm2_float(src, dst, ftype: str = "f16"):
    """The packaged SmolLM2-135M Q4_1 GGUF dequantized (gguf-py) and written as F16 or F32
    (exact), as convert_hf_to_gguf writes them (2-D weights in ftype, norms F32), every
    metadata key copied but general.file_type. Real weights in a file llama.cpp can
    requantize to any type."""
    import gguf
    import numpy as np

    dtypes = {"f16": (np.float16, gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "f32": (np.float32, gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32)}
    dtype, tensor_type, file_type = dtypes[ftype]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(n) for n in reversed(t.shape)])
        if data.ndim >= 2:
            writer.add_tensor(t.name, data.astype(dtype), raw_dtype=tensor_type)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# ---------------------------------------------------------------- the llama-perplexity binary

# Built from llama-cpp-python's sdist (vendor/llama.cpp, cmake --target llama-perplexity).
LLAMA_PERPLEXITY = os.environ.get("LLAMA_PERPLEXITY") or shutil.which("llama-perplexity")

_KLD_FIGURES = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "kld": r"Mean\s+KLD:\s*(-?[\d.]+)",
                "rms_delta_p": r"RMS Δp\s*:\s*([\d.]+) ±", "same_top_p": r"Same top p:\s*([\d.]+) ±"}


def run_llama_perplexity(binary, model, ctx: int, *args, threads: int = 2) -> dict[str, float]:
    """llama-perplexity -m model -c ctx ARGS with an F32 KV cache (as ours) -> its printed
    figures: "ppl" (the final estimate, or Mean PPL(Q) with --kl-divergence), and with
    --kl-divergence "kld", "rms_delta_p" and "same_top_p" (fractions, not %)."""
    cmd = [str(binary), "-m", str(model), "-c", str(ctx), "-t", str(threads), "-ctk", "f32", "-ctv", "f32",
           *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}:\n{out[-2000:]}")
    if "--kl-divergence" not in args:
        return {"ppl": float(re.search(r"Final estimate: PPL = ([\d.]+)", out).group(1))}
    found = {k: float(re.search(pattern, out).group(1)) for k, pattern in _KLD_FIGURES.items()}
    found["rms_delta_p"] /= 100
    found["same_top_p"] /= 100
    return found
