"""A GGUF reader that treats the file as untrusted input.

Every count, length, dimension and offset the file declares is checked on
Python ints against the bytes that are really there before anything is read
or allocated on its behalf, so a 200-byte file that claims 2^60 elements is
refused in microseconds. Each refusal is one `GGUFError` naming the file, the
field (key, tensor) and the byte offset where the bad value sits.

Tensor data is never read here: `quant_tensor` returns zero-copy torch views
over a private (copy-on-write) mapping of the file. The mapping is writable
from torch's point of view, so torch does not warn about read-only buffers,
and a stray in-place op on a weight changes only this process's copy of
that page, never the file.

Decisions beyond ggml's own checks (ggml/src/gguf.cpp):
- A dimension of 0 is refused. ggml accepts zero-element tensors, but no
  weight of a model this runtime runs can be empty, so such a file is damaged.
- n_dims must be 1..4 (ggml also takes 0, meaning a scalar).
- Tensor names must be non-empty as well as <= 63 bytes.
- Tensors may come in any order in the data section, but must not overlap.
  Only their own bytes must be in the file, not the padding after the last
  one (llama.cpp's model loader checks the same).
- Strings (keys, values, tensor names) must be valid UTF-8, as the spec says.
- Only little-endian files: a byte-swapped version field is refused.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from math import prod

import numpy as np
import torch

from ..errors import GGUFError
from .constants import BLOCK_SIZES, FLOAT_DTYPES, SUPPORTED_TYPES, GGMLType
from .tensors import QuantTensor

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v2 and v3 share one layout; v1 had 32-bit counts
HEADER_BYTES = 24  # magic, version, n_tensors, n_kv
DEFAULT_ALIGNMENT = 32
# Largest page size of any platform ggml runs on is 64 KiB; 1 MiB leaves room
# for odd choices while refusing values that can only be corruption.
MAX_ALIGNMENT = 1 << 20
MAX_STRING_BYTES = 16 << 20  # the longest real strings are chat templates of a few KiB
# 2^24 elements is 64x the largest vocabulary in use (262k); more can only mean
# a damaged count, and each string element costs a Python step.
MAX_ARRAY_ELEMENTS = 1 << 24
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4
# Smallest possible records, used to bound the declared counts by the file size.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Scalar value types: (struct format, numpy dtype for arrays of them).
_SCALAR_FORMATS: dict[ValueType, tuple[struct.Struct, str]] = {
    ValueType.UINT8: (struct.Struct("<B"), "<u1"),
    ValueType.INT8: (struct.Struct("<b"), "<i1"),
    ValueType.UINT16: (struct.Struct("<H"), "<u2"),
    ValueType.INT16: (struct.Struct("<h"), "<i2"),
    ValueType.UINT32: (struct.Struct("<I"), "<u4"),
    ValueType.INT32: (struct.Struct("<i"), "<i4"),
    ValueType.FLOAT32: (struct.Struct("<f"), "<f4"),
    ValueType.BOOL: (struct.Struct("<B"), "<u1"),
    ValueType.UINT64: (struct.Struct("<Q"), "<u8"),
    ValueType.INT64: (struct.Struct("<q"), "<i8"),
    ValueType.FLOAT64: (struct.Struct("<d"), "<f8"),
}
_VALUE_TYPES = {int(t): t for t in ValueType}
_GGML_TYPES = {int(t): t for t in GGMLType}
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLType
    ne: tuple[int, ...]  # GGUF order: ne[0] is the contiguous (column) axis
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order: (rows, cols) for a 2-D weight."""
        return tuple(reversed(self.ne))


class GGUFFile:
    """One GGUF file, parsed and validated in full on construction."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            self.size = os.fstat(fh.fileno()).st_size
            if self.size < HEADER_BYTES:
                raise GGUFError(f"{self.path}: file is {self.size} bytes, shorter than the "
                                f"{HEADER_BYTES}-byte GGUF header")
            self._mm: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.metadata: dict[str, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.alignment = DEFAULT_ALIGNMENT
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- low-level reads: every one checks the bytes are there first ---------
    # A field is described as (field, context), e.g. ("value type", "metadata
    # key 'x'"), and the two are joined only when an error is raised: the
    # happy path formats no strings.

    def _fail(self, at: int, field: str, context: str | None, problem: str) -> GGUFError:
        what = field if context is None else f"{field} of {context}"
        return GGUFError(f"{self.path}: {what} at byte offset {at}: {problem}")

    def _need(self, nbytes: int, field: str, context: str | None) -> None:
        left = self.size - self._pos
        if nbytes > left:
            raise self._fail(self._pos, field, context,
                             f"needs {nbytes} bytes but only {left} remain in the {self.size}-byte file")

    def _read(self, fmt: struct.Struct, field: str, context: str | None = None) -> int | float:
        pos = self._pos
        if fmt.size > self.size - pos:
            self._need(fmt.size, field, context)
        (value,) = fmt.unpack_from(self._mm, pos)
        self._pos = pos + fmt.size
        return value

    def _read_string(self, field: str, context: str | None, max_bytes: int = MAX_STRING_BYTES) -> str:
        at = self._pos
        if self.size - at < 8:
            self._need(8, f"length of {field}", context)
        (n,) = _U64.unpack_from(self._mm, at)
        self._pos = at + 8
        if n > max_bytes:
            raise self._fail(at, f"length of {field}", context, f"{n} bytes exceeds the limit of {max_bytes}")
        return self._decode(n, field, context)

    def _decode(self, n: int, field: str, context: str | None) -> str:
        pos = self._pos
        if n > self.size - pos:
            self._need(n, field, context)
        try:
            text = self._mm[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(pos, field, context,
                             f"not valid UTF-8 ({e.reason} at byte {e.start} of the string)") from None
        self._pos = pos + n
        return text

    # -- the file, top to bottom ---------------------------------------------

    def _parse(self) -> None:
        self._pos = 0
        magic = self._mm[0:4]
        if magic != GGUF_MAGIC:
            raise self._fail(0, "magic", None, f"expected {GGUF_MAGIC!r}, found {magic!r}")
        self._pos = 4
        version = self._read(_U32, "version")
        if version != 0 and version & 0xFFFF == 0:
            raise self._fail(4, "version", None, f"{version:#010x} looks byte-swapped: this is a "
                                                 "big-endian GGUF file, only little-endian files are supported")
        if version not in SUPPORTED_VERSIONS:
            raise self._fail(4, "version", None, f"GGUF version {version} is not supported "
                                                 f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        n_tensors = self._read(_U64, "n_tensors")
        n_kv = self._read(_U64, "n_kv")
        left = self.size - self._pos
        least = n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES
        if least > left:
            raise self._fail(8, "n_tensors/n_kv", None,
                             f"{n_tensors} tensors and {n_kv} metadata entries need at least {least} bytes, "
                             f"but only {left} follow the header")
        for i in range(n_kv):
            self._parse_kv(i)
        self._names: set[str] = set()
        infos = [self._parse_tensor_info(i) for i in range(n_tensors)]
        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        self._place_tensors(infos)

    def _parse_kv(self, index: int) -> None:
        at = self._pos
        key = self._read_string("key", f"metadata entry #{index}")
        if not key:
            raise self._fail(at, "key", f"metadata entry #{index}", "key is empty")
        context = f"metadata key {key!r}"
        if key in self.metadata:
            raise self._fail(at, context, None, "duplicate key")
        type_at = self._pos
        vtype = self._read_value_type("value type", context)
        if vtype is ValueType.ARRAY:
            value = self._read_array(context)
        elif vtype is ValueType.STRING:
            value = self._read_string("string value", context)
        else:
            value = self._read(_SCALAR_FORMATS[vtype][0], "value", context)
            if vtype is ValueType.BOOL:
                value = value != 0
        if key == "general.alignment":
            if vtype is not ValueType.UINT32:
                raise self._fail(type_at, context, None, f"must be of type UINT32, found {vtype.name}")
            if value == 0 or value & (value - 1) or value > MAX_ALIGNMENT:
                raise self._fail(type_at + 4, context, None,
                                 f"{value} is not a power of two in 1..{MAX_ALIGNMENT}")
            self.alignment = value
        self.metadata[key] = value

    def _read_value_type(self, field: str, context: str) -> ValueType:
        at = self._pos
        raw = self._read(_U32, field, context)
        vtype = _VALUE_TYPES.get(raw)
        if vtype is None:
            raise self._fail(at, field, context, f"unknown GGUF value type {raw}")
        return vtype

    def _read_array(self, key_context: str) -> list:
        context = f"array value of {key_context}"
        etype_at = self._pos
        etype = self._read_value_type("element type", context)
        if etype is ValueType.ARRAY:
            raise self._fail(etype_at, context, None, "nested arrays are not allowed")
        count_at = self._pos
        count = self._read(_U64, "element count", context)
        if count > MAX_ARRAY_ELEMENTS:
            raise self._fail(count_at, "element count", context,
                             f"{count} exceeds the limit of {MAX_ARRAY_ELEMENTS}")
        # Each string element is at least its 8-byte length: checking that first
        # bounds the loop below by the file size.
        elem_bytes = 8 if etype is ValueType.STRING else _SCALAR_FORMATS[etype][0].size
        left = self.size - self._pos
        if count * elem_bytes > left:
            raise self._fail(count_at, "element count", context,
                             f"{count} elements of {etype.name} need at least {count * elem_bytes} "
                             f"bytes but only {left} remain")
        if etype is ValueType.STRING:
            return self._read_string_array(context, count)
        if count == 0:
            return []
        values = np.frombuffer(self._mm, dtype=_SCALAR_FORMATS[etype][1], count=count, offset=self._pos)
        self._pos += count * elem_bytes
        if etype is ValueType.BOOL:
            return (values != 0).tolist()
        return values.tolist()

    def _read_string_array(self, context: str, count: int) -> list[str]:
        # The hot loop of a vocabulary load (150k tokens): locals only, and the
        # rare failures (short buffer, bad UTF-8) caught once outside the loop.
        mm, end, pos = self._mm, self.size, self._pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        j = 0
        try:
            for j in range(count):
                (n,) = unpack(mm, pos)
                pos += 8
                if n > MAX_STRING_BYTES or n > end - pos:
                    raise self._fail(pos - 8, f"length of element {j}", context,
                                     f"{n} bytes exceeds the limit of {MAX_STRING_BYTES} or the "
                                     f"{end - pos} bytes remaining")
                append(mm[pos:pos + n].decode("utf-8"))
                pos += n
        except struct.error:
            raise self._fail(pos, f"length of element {j}", context,
                             f"needs 8 bytes but only {end - pos} remain in the {end}-byte file") from None
        except UnicodeDecodeError as e:
            raise self._fail(pos, f"element {j}", context,
                             f"not valid UTF-8 ({e.reason} at byte {e.start} of the string)") from None
        self._pos = pos
        return out

    def _parse_tensor_info(self, index: int) -> tuple[str, GGMLType, tuple[int, ...], int, int, int]:
        at = self._pos
        info_context = f"tensor info #{index}"
        n = self._read(_U64, "name length", info_context)
        if n == 0 or n > MAX_NAME_BYTES:
            raise self._fail(at, "name length", info_context, f"{n} bytes, must be 1..{MAX_NAME_BYTES}")
        name = self._decode(n, "name", info_context)
        if name in self._names:
            raise self._fail(at, "name", info_context, f"duplicate tensor name {name!r}")
        self._names.add(name)
        context = f"tensor {name!r}"
        dims_at = self._pos
        n_dims = self._read(_U32, "n_dims", context)
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(dims_at, "n_dims", context, f"{n_dims}, must be 1..{MAX_DIMS}")
        ne = []
        for d in range(n_dims):
            d_at = self._pos
            dim = self._read(_I64, f"dimension {d}", context)
            if dim <= 0:
                raise self._fail(d_at, f"dimension {d}", context, f"{dim}, every dimension must be >= 1")
            ne.append(dim)
        nelements = prod(ne)
        if nelements >= 1 << 63:
            raise self._fail(dims_at + 4, "shape", context, f"{ne} holds {nelements} elements, at least 2^63")
        type_at = self._pos
        raw_type = self._read(_I32, "type", context)
        qtype = _GGML_TYPES.get(raw_type)
        if qtype is None:
            raise self._fail(type_at, "type", context, f"unknown ggml type {raw_type}")
        if qtype not in SUPPORTED_TYPES:
            raise self._fail(type_at, "type", context,
                             f"{qtype.name} is not supported by this runtime (supported: "
                             f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        block, block_bytes = BLOCK_SIZES[qtype]
        if ne[0] % block:
            raise self._fail(dims_at + 4, "shape", context,
                             f"row length ne[0]={ne[0]} is not a multiple of the {qtype.name} block size {block}")
        offset_at = self._pos
        offset = self._read(_U64, "data offset", context)
        if offset % self.alignment:
            raise self._fail(offset_at, "data offset", context,
                             f"{offset} is not a multiple of the alignment {self.alignment}")
        return name, qtype, tuple(ne), offset, nelements // block * block_bytes, at

    def _place_tensors(self, infos: list[tuple[str, GGMLType, tuple[int, ...], int, int, int]]) -> None:
        for name, qtype, ne, offset, nbytes, at in infos:
            start = self.data_offset + offset
            if start + nbytes > self.size:
                raise self._fail(at, f"tensor {name!r}", None,
                                 f"its {nbytes} bytes at data offset {offset} (file byte {start}) "
                                 f"end past the end of the {self.size}-byte file")
            self.tensors[name] = TensorInfo(name, qtype, ne, start, nbytes)
        by_offset = sorted(self.tensors.values(), key=lambda t: t.offset)
        for prev, cur in zip(by_offset, by_offset[1:]):
            if cur.offset < prev.offset + prev.nbytes:
                raise GGUFError(f"{self.path}: tensor {cur.name!r} at byte offset {cur.offset} "
                                f"overlaps tensor {prev.name!r} (bytes {prev.offset}.."
                                f"{prev.offset + prev.nbytes - 1})")

    # -- tensor data -----------------------------------------------------------

    def quant_tensor(self, name: str) -> QuantTensor:
        """Zero-copy view of one tensor as (rows, cols) = (prod(ne[1:]), ne[0]); 1-D gives (1, n)."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed; cannot read tensor {name!r}")
        cols = info.ne[0]
        rows = prod(info.ne) // cols
        # np.frombuffer holds a buffer export on the mapping, so the mapping
        # cannot be unmapped while any tensor made from it is alive.
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.qtype in FLOAT_DTYPES:
            dtype = FLOAT_DTYPES[info.qtype]
            if info.offset % dtype.itemsize:
                # Only files with general.alignment below the element size get
                # here; give the kernels an aligned copy instead.
                raw = raw.copy()
            data = torch.from_numpy(raw).view(dtype).view(rows, cols)
        else:
            data = torch.from_numpy(raw).view(rows, info.nbytes // rows)
        return QuantTensor(data, info.qtype, (rows, cols))

    def close(self) -> None:
        """Release the mapping; tensors already handed out keep their pages alive."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views are still alive; the mapping goes when the last one does

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")
