"""GGUF files for the reader's tests.

- `write_golden`: a small, well-formed file written by gguf-py's GGUFWriter
  (the reference writer), with every scalar value type, several array types
  and tensors of F32/F16/BF16/Q8_0/Q4_K.
- `RawGGUF`: a byte-by-byte builder for handcrafted (malformed) files that
  records where each field lands, so tests can check that an error names it.
- `handcrafted`: the file kinds of llama.cpp's tests/test-gguf.cpp
  (enum handcrafted_file_type), rebuilt with RawGGUF.
- `golden_field_slots`: where every count/length/type/dim/offset field of a
  file lies, as located by gguf-py's GGUFReader (not by the reader under test).
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from smollm3_triton.gguf.constants import BLOCK_SIZES, SUPPORTED_TYPES, GGMLType

# ---------------------------------------------------------------------------
# golden file

GOLDEN_SCALARS: list[tuple[str, VT, object]] = [
    ("test.u8", VT.UINT8, 200),
    ("test.i8", VT.INT8, -100),
    ("test.u16", VT.UINT16, 60000),
    ("test.i16", VT.INT16, -30000),
    ("test.u32", VT.UINT32, 4_000_000_000),
    ("test.i32", VT.INT32, -2_000_000_000),
    ("test.f32", VT.FLOAT32, 0.1),
    ("test.u64", VT.UINT64, 2**64 - 1),
    ("test.i64", VT.INT64, -(2**63)),
    ("test.f64", VT.FLOAT64, 1e-300),
    ("test.bool_true", VT.BOOL, True),
    ("test.bool_false", VT.BOOL, False),
    ("test.str", VT.STRING, "h\u00e9llo \u2603 \U0001F600"),
    ("test.str_empty", VT.STRING, ""),
    ("tokenizer.ggml.bos_token_id", VT.UINT32, 1),
]
GOLDEN_ARRAYS: list[tuple[str, VT, list]] = [
    ("test.arr_i32", VT.INT32, [1, -2, 3, 2**31 - 1]),
    ("test.arr_f32", VT.FLOAT32, [0.5, -1.25, 3.0e38]),
    ("test.arr_u8", VT.UINT8, [0, 1, 255]),
    ("test.arr_u64", VT.UINT64, [2**64 - 1, 0]),
    ("test.arr_f64", VT.FLOAT64, [1.0 / 3.0, -0.0]),
    ("test.arr_bool", VT.BOOL, [True, False, True]),
    ("test.arr_str", VT.STRING, ["a", "", "\u00df\u2603", "x" * 40]),
    ("tokenizer.ggml.tokens", VT.STRING, ["<unk>", "<s>", "</s>", "\u0120the", "\u0120a", "ing"]),
    ("tokenizer.ggml.token_type", VT.INT32, [2, 3, 3, 1, 1, 1]),
]


def _as_stored(vtype: VT, value):
    """The value a reader must give back: FLOAT32 values are rounded to float32."""
    if vtype == VT.FLOAT32:
        return float(np.float32(value))
    return value


def golden_tensors() -> dict[str, tuple[QT, np.ndarray]]:
    """name -> (type, the array handed to GGUFWriter.add_tensor)."""
    rng = np.random.default_rng(1234)
    q8_src = rng.standard_normal((4, 64)).astype(np.float32)
    return {
        "f32_2d.weight": (QT.F32, rng.standard_normal((3, 8)).astype(np.float32)),
        "norm_1d.weight": (QT.F32, rng.standard_normal(16).astype(np.float32)),
        "f16_2d.weight": (QT.F16, rng.standard_normal((4, 32)).astype(np.float16)),
        "bf16_2d.weight": (QT.BF16, rng.integers(0, 2**16, (2, 8), dtype=np.uint16)),
        "q8_0.weight": (QT.Q8_0, gguf.quants.quantize(q8_src, QT.Q8_0)),
        # Raw Q4_K blocks: the reader must hand back bytes, whatever they encode.
        "q4_k.weight": (QT.Q4_K, rng.integers(0, 256, (2, 144), dtype=np.uint8)),
        "f32_3d.weight": (QT.F32, rng.standard_normal((2, 3, 4)).astype(np.float32)),
    }


@dataclass
class Golden:
    path: str
    metadata: dict[str, object]  # what was written, as a reader must return it
    tensors: dict[str, tuple[QT, np.ndarray]]


def write_golden(path) -> Golden:
    w = gguf.GGUFWriter(str(path), "llama")
    metadata: dict[str, object] = {"general.architecture": "llama"}
    for key, vtype, value in GOLDEN_SCALARS:
        w.add_key_value(key, value, vtype)
        metadata[key] = _as_stored(vtype, value)
    for key, vtype, values in GOLDEN_ARRAYS:
        w.add_key_value(key, values, VT.ARRAY, sub_type=vtype)
        metadata[key] = [_as_stored(vtype, v) for v in values]
    tensors = golden_tensors()
    for name, (qtype, arr) in tensors.items():
        raw = None if qtype in (QT.F32, QT.F16) else qtype
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Golden(str(path), metadata, tensors)


# ---------------------------------------------------------------------------
# where the count/length fields of a file are, per gguf-py


@dataclass(frozen=True)
class Slot:
    offset: int
    width: int  # bytes
    label: str
    signed: bool = False


def golden_field_slots(path) -> list[Slot]:
    """Every count, length, type, n_dims, dim and data-offset field of `path`."""
    r = gguf.GGUFReader(str(path))
    base = r.data.ctypes.data

    def at(part: np.ndarray) -> int:
        return part.ctypes.data - base

    slots = [Slot(8, 8, "n_tensors"), Slot(16, 8, "n_kv")]
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        p = f.parts
        slots += [Slot(at(p[0]), 8, f"key length of {f.name}"), Slot(at(p[2]), 4, f"value type of {f.name}")]
        if f.types[0] == VT.STRING:
            slots.append(Slot(at(p[3]), 8, f"string length of {f.name}"))
        elif f.types[0] == VT.ARRAY:
            slots += [Slot(at(p[3]), 4, f"element type of {f.name}"), Slot(at(p[4]), 8, f"count of {f.name}")]
            if f.types[-1] == VT.STRING:
                slots += [Slot(at(p[i]), 8, f"element {(i - 5) // 2} length of {f.name}")
                          for i in range(5, len(p), 2)]
    for t in r.tensors:
        name_len, _name, n_dims, dims, ttype, offset = t.field.parts
        slots += [Slot(at(name_len), 8, f"name length of {t.name}"), Slot(at(n_dims), 4, f"n_dims of {t.name}")]
        slots += [Slot(at(dims) + 8 * k, 8, f"ne[{k}] of {t.name}", signed=True) for k in range(len(dims))]
        slots += [Slot(at(ttype), 4, f"type of {t.name}", signed=True), Slot(at(offset), 8, f"offset of {t.name}")]
    return slots


# ---------------------------------------------------------------------------
# handcrafted files


class RawGGUF:
    """Appends GGUF fields little-endian and remembers where labelled ones start."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.at: dict[str, int] = {}

    def mark(self, label: str | None) -> None:
        if label is not None:
            self.at[label] = len(self.buf)

    def raw(self, data: bytes, label: str | None = None) -> None:
        self.mark(label)
        self.buf += data

    def u32(self, v: int, label: str | None = None) -> None:
        self.raw(struct.pack("<I", v % 2**32), label)

    def i32(self, v: int, label: str | None = None) -> None:
        self.raw(struct.pack("<i", v), label)

    def u64(self, v: int, label: str | None = None) -> None:
        self.raw(struct.pack("<Q", v % 2**64), label)

    def i64(self, v: int, label: str | None = None) -> None:
        self.raw(struct.pack("<q", v), label)

    def string(self, s: str | bytes, label: str | None = None, length: int | None = None) -> None:
        b = s.encode() if isinstance(s, str) else s
        self.u64(len(b) if length is None else length, label)
        self.raw(b)

    def header(self, n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> None:
        self.raw(magic, "magic")
        self.u32(version, "version")
        self.u64(n_tensors, "n_tensors")
        self.u64(n_kv, "n_kv")

    def value(self, vtype: int, v) -> None:
        if vtype == VT.STRING:
            self.string(v)
        else:
            self.raw(struct.pack("<" + SCALAR_FMT[vtype], v))

    def kv(self, key: str | bytes, vtype: int, v, sub: int | None = None, label: str | None = None) -> None:
        self.string(key, label)
        self.u32(vtype, None if label is None else f"{label}.type")
        if vtype == VT.ARRAY:
            self.u32(sub, None if label is None else f"{label}.sub")
            self.u64(len(v), None if label is None else f"{label}.count")
            for x in v:
                self.value(sub, x)
        else:
            self.value(vtype, v)

    def tensor_info(self, name: str | bytes, ne: list[int], qtype: int, offset: int,
                    label: str | None = None, n_dims: int | None = None) -> None:
        self.string(name, label)
        self.u32(len(ne) if n_dims is None else n_dims, None if label is None else f"{label}.n_dims")
        for k, d in enumerate(ne):
            self.i64(d, None if label is None else f"{label}.ne{k}")
        self.i32(qtype, None if label is None else f"{label}.type")
        self.u64(offset, None if label is None else f"{label}.offset")

    def pad(self, alignment: int) -> None:
        self.buf += bytes(-len(self.buf) % alignment)

    def getvalue(self) -> bytes:
        return bytes(self.buf)


SCALAR_FMT = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I",
              VT.INT32: "i", VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q",
              VT.FLOAT64: "d"}
_SCALAR_BITS = {VT.UINT8: (8, False), VT.INT8: (8, True), VT.UINT16: (16, False), VT.INT16: (16, True),
                VT.UINT32: (32, False), VT.INT32: (32, True), VT.UINT64: (64, False), VT.INT64: (64, True)}


def nbytes_of(qtype: int, ne: list[int]) -> int:
    block, size = BLOCK_SIZES[GGMLType(qtype)]
    n = 1
    for d in ne:
        n *= d
    return n // block * size


def _random_value(rng: random.Random, vtype: VT):
    if vtype in _SCALAR_BITS:
        bits, signed = _SCALAR_BITS[vtype]
        lo = -(2 ** (bits - 1)) if signed else 0
        return rng.randint(lo, lo + 2**bits - 1)
    if vtype == VT.FLOAT32:
        return float(np.float32(rng.uniform(-1e6, 1e6)))
    if vtype == VT.FLOAT64:
        return rng.uniform(-1e300, 1e300)
    if vtype == VT.BOOL:
        return rng.random() < 0.5
    return "".join(rng.choice("abcXYZ019 _\u00e9\u2603\U0001F600") for _ in range(rng.randrange(24)))


# Kinds of llama.cpp's enum handcrafted_file_type, plus F32 twins of the cases
# whose llama.cpp tensors have types this runtime does not support (I8, I64):
# the twins reach the size checks that the original cases are about.
HANDCRAFTED_KINDS = [
    "HEADER_BAD_MAGIC", "HEADER_BAD_VERSION_0", "HEADER_BAD_VERSION_1", "HEADER_BAD_VERSION_FUTURE",
    "HEADER_BAD_N_KV", "HEADER_BAD_N_TENSORS", "HEADER_EMPTY",
    "KV_BAD_KEY_SIZE", "KV_EMPTY_KEY", "KV_BAD_TYPE", "KV_DUPLICATE_KEY", "KV_BAD_ALIGN",
    "KV_WRONG_TYPE_ALIGN", "KV_SUCCESS",
    "TENSORS_BAD_NAME_SIZE", "TENSORS_BAD_N_DIMS", "TENSORS_BAD_SHAPE", "TENSORS_ZERO_DIM",
    "TENSORS_NE_TOO_BIG", "TENSORS_NBYTES_TOO_BIG", "TENSORS_NBYTES_TOO_BIG_F32", "TENSORS_BAD_TYPE",
    "TENSORS_BAD_OFFSET", "TENSORS_DUPLICATE_NAME", "TENSORS_BAD_ALIGN", "TENSORS_INCONSISTENT_ALIGN",
    "TENSORS_SUCCESS", "TENSORS_CUSTOM_ALIGN",
    "DATA_NOT_ENOUGH_DATA", "DATA_BAD_ALIGN", "DATA_INCONSISTENT_ALIGN", "DATA_MEM_SIZE_OVERFLOW",
    "DATA_MEM_SIZE_OVERFLOW_F32", "DATA_SUCCESS", "DATA_CUSTOM_ALIGN",
]
GGML_TYPE_COUNT = 40  # one past MXFP4 (39), the last type ggml defines


@dataclass
class Handcrafted:
    data: bytes
    at: dict[str, int]
    metadata: dict[str, object] = field(default_factory=dict)
    # name -> (type, ne, offset relative to the data section, nbytes)
    tensors: dict[str, tuple[int, tuple[int, ...], int, int]] = field(default_factory=dict)
    alignment: int = 32


def handcrafted(kind: str, seed: int = 0) -> Handcrafted:
    """One file of `kind`, shaped like llama.cpp's get_handcrafted_file."""
    assert kind in HANDCRAFTED_KINDS, kind
    rng = random.Random(seed)
    stage = kind.split("_")[0]
    w = RawGGUF()
    out = Handcrafted(b"", w.at)

    tensors: list[tuple[int, list[int]]] = []
    if stage in ("TENSORS", "DATA"):
        types = sorted(SUPPORTED_TYPES)
        for _ in range(12):
            qtype = rng.choice(types)
            ne = [(1 + rng.randrange(10)) * BLOCK_SIZES[qtype][0]]
            ne += [1 + rng.randrange(4) for _ in range(rng.randrange(4))]
            tensors.append((int(qtype), ne))
    if kind == "DATA_MEM_SIZE_OVERFLOW":
        tensors = [(int(GGMLType.I8), [0x7FFFFFFFFFFFFFC0])] * 2
    if kind == "DATA_MEM_SIZE_OVERFLOW_F32":
        tensors = [(int(GGMLType.F32), [0x1FFFFFFFFFFFFFC0])] * 2

    kv_types: list[tuple[VT, VT | None]] = []
    if stage != "HEADER":
        for _ in range(30):
            t = VT(rng.randrange(13))
            if t == VT.ARRAY:
                sub = VT(rng.randrange(13))
                if sub != VT.ARRAY:
                    kv_types.append((t, sub))
            else:
                kv_types.append((t, None))

    align_kinds = {"KV_BAD_ALIGN", "KV_WRONG_TYPE_ALIGN", "TENSORS_BAD_ALIGN", "TENSORS_CUSTOM_ALIGN",
                   "DATA_BAD_ALIGN", "DATA_CUSTOM_ALIGN"}
    version = {"HEADER_BAD_VERSION_0": 0, "HEADER_BAD_VERSION_1": 1, "HEADER_BAD_VERSION_FUTURE": 4}.get(kind, 3)
    n_tensors = 2**64 - 1 if kind == "HEADER_BAD_N_TENSORS" else len(tensors)
    n_kv = 2**64 - 1 if kind == "HEADER_BAD_N_KV" else len(kv_types) + (kind in align_kinds)
    w.header(n_tensors, n_kv, version, b"FUGG" if kind == "HEADER_BAD_MAGIC" else b"GGUF")
    alignment = 32
    if stage == "HEADER":
        w.pad(alignment)
        out.data = w.getvalue()
        return out

    for i, (t, sub) in enumerate(kv_types):
        key = "" if kind == "KV_EMPTY_KEY" else f"my_key_{i // 2 if kind == 'KV_DUPLICATE_KEY' else i}"
        label = f"kv{i}"
        if kind == "KV_BAD_TYPE":
            w.string(key, label)
            w.u32(13, f"{label}.type")
            w.raw(b"\x00")
            continue
        w.string(key, label, length=2**64 - 1 if kind == "KV_BAD_KEY_SIZE" else None)
        w.u32(t, f"{label}.type")
        if t == VT.ARRAY:
            n = rng.randrange(17)
            values = [_random_value(rng, sub) for _ in range(n)]
            w.u32(sub, f"{label}.sub")
            w.u64(n, f"{label}.count")
            for v in values:
                w.value(sub, v)
            out.metadata[key] = values
        else:
            v = _random_value(rng, t)
            w.value(t, v)
            out.metadata[key] = v

    if kind in align_kinds:
        alignment = 1 if kind.endswith("CUSTOM_ALIGN") else 13
        w.string("general.alignment", "alignment")
        w.u32(VT.INT32 if kind == "KV_WRONG_TYPE_ALIGN" else VT.UINT32, "alignment.type")
        w.u32(alignment, "alignment.value")
        out.metadata["general.alignment"] = alignment
    out.alignment = alignment
    if stage == "KV":
        w.pad(alignment)
        out.data = w.getvalue()
        return out

    # INCONSISTENT_ALIGN: offsets laid out for alignment 1 while the file keeps the default 32
    layout_alignment = 1 if kind.endswith("INCONSISTENT_ALIGN") else alignment
    offset = 0
    for i, (qtype, ne) in enumerate(tensors):
        if kind == "TENSORS_NBYTES_TOO_BIG":
            qtype = int(GGMLType.I64)
        elif kind == "TENSORS_NBYTES_TOO_BIG_F32":
            qtype = int(GGMLType.F32)
        name = "my_tensor" + ("" if kind == "TENSORS_DUPLICATE_NAME" else f"_{i}")
        if kind == "TENSORS_BAD_NAME_SIZE":
            name += "_with_a_very_long_name_which_is_longer_than_what_is_allowed_for_ggml_tensors"
        dims = list(ne)
        if kind in ("TENSORS_NE_TOO_BIG", "TENSORS_NBYTES_TOO_BIG", "TENSORS_NBYTES_TOO_BIG_F32") and len(dims) < 2:
            dims.append(1)
        if kind == "TENSORS_BAD_SHAPE":
            dims = [-1] * len(dims)
        elif kind == "TENSORS_ZERO_DIM":
            dims = [dims[0], 0]
        elif kind == "TENSORS_NE_TOO_BIG":
            dims = [4 * (2**31 - 1)] * len(dims)
        elif kind.startswith("TENSORS_NBYTES_TOO_BIG"):
            block, size = BLOCK_SIZES[GGMLType(qtype)]
            big_ne = (2**64 - 1) // size
            root = int(1.01 * big_ne ** (1.0 / len(dims))) + 1
            dims = [-(-root // block) * block] * len(dims)
        written_type = GGML_TYPE_COUNT if kind == "TENSORS_BAD_TYPE" else qtype
        written_offset = 2**64 - 1 if kind == "TENSORS_BAD_OFFSET" else offset
        w.tensor_info(name, dims, written_type, written_offset, f"t{i}",
                      n_dims=5 if kind == "TENSORS_BAD_N_DIMS" else None)
        nbytes = nbytes_of(qtype, ne)
        out.tensors[name] = (qtype, tuple(ne), offset, nbytes)
        offset += -(-nbytes // layout_alignment) * layout_alignment
    w.pad(alignment)
    w.mark("data")
    if stage == "DATA":
        nbytes = offset
        if kind == "DATA_NOT_ENOUGH_DATA":
            # llama.cpp's case drops the last byte of the padded section; a loader
            # only needs the tensors' own bytes (llama.cpp's model loader checks
            # just those too), so drop the last byte of the last tensor instead.
            _, _, last_offset, last_nbytes = out.tensors[name]
            nbytes = last_offset + last_nbytes - 1
        if kind.startswith("DATA_MEM_SIZE_OVERFLOW"):
            nbytes = 32
        w.raw(bytes(j % 256 for j in range(nbytes)))
    out.data = w.getvalue()
    return out


# ---------------------------------------------------------------------------
# the oracle: gguf-py's GGUFReader on the same file


def same_value(a, b) -> bool:
    """Equality that also holds for NaN == NaN and tells bool from int."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def assert_matches_gguf_py(f, path) -> None:
    """Our parse of `path` equals gguf-py's: keys in order, values, tensor table and bytes."""
    r = gguf.GGUFReader(str(path))
    fields = {k: v for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(fields)
    for key, fld in fields.items():
        theirs = fld.contents()
        if fld.types[-1] == VT.BOOL:
            theirs = [bool(x) for x in theirs] if isinstance(theirs, list) else bool(theirs)
        assert same_value(f.metadata[key], theirs), (key, f.metadata[key], theirs)
    assert f.data_offset == r.data_offset
    assert list(f.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        info = f.tensors[t.name]
        assert int(info.qtype) == int(t.tensor_type)
        assert info.ne == tuple(int(d) for d in t.shape)
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes
        assert tensor_bytes(f, t.name) == t.data.tobytes(), t.name


def tensor_bytes(f, name: str) -> bytes:
    """The raw bytes behind f.quant_tensor(name), whatever its dtype."""
    return f.quant_tensor(name).data.reshape(-1).view(torch.uint8).numpy().tobytes()
