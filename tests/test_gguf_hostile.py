"""GGUFFile on hostile files: every handcrafted case of llama.cpp's
tests/test-gguf.cpp, further malformations, a truncation sweep over the
header, and a seeded random sweep of every count and length field.

Each refusal must be a GGUFError naming the field and its byte offset, come
fast, and allocate next to nothing whatever sizes the file declares."""
from __future__ import annotations

import os
import random
import re
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from gguf import GGUFValueType as VT

from smollm3_triton.errors import GGUFError
from smollm3_triton.gguf.constants import GGMLType
from smollm3_triton.gguf.reader import MAX_STRING_BYTES, GGUFFile
from tests.helpers.cpu_time import own_cpu_seconds
from tests.helpers.gguf_cases import (
    HANDCRAFTED_KINDS,
    RawGGUF,
    assert_matches_gguf_py,
    golden_field_slots,
    handcrafted,
    tensor_bytes,
    write_golden,
)

F32, Q8_0 = int(GGMLType.F32), int(GGMLType.Q8_0)


def load(tmp_path: Path, data: bytes, name: str = "x.gguf") -> GGUFFile:
    path = tmp_path / name
    path.write_bytes(data)
    return GGUFFile(path)


def open_timed(path: Path) -> tuple[GGUFFile | GGUFError, float]:
    """GGUFFile(path) or the GGUFError it raised, and the parser's own CPU seconds."""
    with own_cpu_seconds() as cpu:
        try:
            result = GGUFFile(path)
        except GGUFError as e:
            result = e
    return result, cpu.seconds


def refuse(tmp_path: Path, data: bytes, pattern: str, at: int | None = None) -> str:
    """Assert the file is refused within 100 ms with a message matching `pattern` (and naming byte `at`)."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    err, seconds = open_timed(path)
    assert isinstance(err, GGUFError), f"loaded: {err}"
    assert seconds < 0.1
    assert re.search(pattern, str(err)), (pattern, str(err))
    msg = str(err)
    assert str(path) in msg
    if at is not None:
        assert f"at byte offset {at}:" in msg, msg
    return msg


# ---------------------------------------------------------------------------
# llama.cpp's handcrafted files

# kind -> (message pattern, label of the field the message must point at)
REFUSALS = {
    "HEADER_BAD_MAGIC": (r"magic.*expected b'GGUF', found b'FUGG'", "magic"),
    "HEADER_BAD_VERSION_0": (r"version.*GGUF version 0 is not supported", "version"),
    "HEADER_BAD_VERSION_1": (r"version.*GGUF version 1 is not supported", "version"),
    "HEADER_BAD_VERSION_FUTURE": (r"version.*GGUF version 4 is not supported", "version"),
    "HEADER_BAD_N_KV": (r"n_tensors/n_kv.*18446744073709551615 metadata entries", "n_tensors"),
    "HEADER_BAD_N_TENSORS": (r"n_tensors/n_kv.*18446744073709551615 tensors", "n_tensors"),
    "KV_BAD_KEY_SIZE": (r"length of key of metadata entry #0.*18446744073709551615 bytes exceeds", "kv0"),
    "KV_EMPTY_KEY": (r"key of metadata entry #0.*key is empty", "kv0"),
    "KV_BAD_TYPE": (r"value type of metadata key 'my_key_0'.*unknown GGUF value type 13", "kv0.type"),
    "KV_DUPLICATE_KEY": (r"metadata key 'my_key_0'.*duplicate key", "kv1"),
    "KV_BAD_ALIGN": (r"general.alignment.*13 is not a power of two", "alignment.value"),
    "KV_WRONG_TYPE_ALIGN": (r"general.alignment.*must be of type UINT32, found INT32", "alignment.type"),
    "TENSORS_BAD_NAME_SIZE": (r"name length of tensor info #0.*87 bytes, must be 1..63", "t0"),
    "TENSORS_BAD_N_DIMS": (r"n_dims of tensor 'my_tensor_0'.*5, must be 1..4", "t0.n_dims"),
    "TENSORS_BAD_SHAPE": (r"dimension 0 of tensor 'my_tensor_0'.*-1, every dimension must be >= 1", "t0.ne0"),
    # llama.cpp accepts zero-element tensors; we refuse them (see gguf_file's docstring)
    "TENSORS_ZERO_DIM": (r"dimension 1 of tensor 'my_tensor_0'.*0, every dimension must be >= 1", "t0.ne1"),
    "TENSORS_NE_TOO_BIG": (r"shape of tensor 'my_tensor_0'.*at least 2\^63", "t0.ne0"),
    "TENSORS_NBYTES_TOO_BIG": (r"type of tensor 'my_tensor_0'.*I64 is not supported", "t0.type"),
    "TENSORS_NBYTES_TOO_BIG_F32": (r"tensor 'my_tensor_0'.*\d{20} bytes at data offset 0.*end past the end", "t0"),
    "TENSORS_BAD_TYPE": (r"type of tensor 'my_tensor_0'.*unknown ggml type 40", "t0.type"),
    "TENSORS_BAD_OFFSET": (r"data offset of tensor 'my_tensor_0'.*18446744073709551615 is not a multiple of the "
                           r"alignment 32", "t0.offset"),
    "TENSORS_DUPLICATE_NAME": (r"name of tensor info #1.*duplicate tensor name 'my_tensor'", "t1"),
    "TENSORS_BAD_ALIGN": (r"general.alignment.*13 is not a power of two", "alignment.value"),
    "TENSORS_INCONSISTENT_ALIGN": (r"data offset of tensor 'my_tensor_\d+'.*not a multiple of the alignment 32", None),
    # llama.cpp passes these two only because its test does not ask for the
    # data; they have no data section, and a loader must refuse that.
    "TENSORS_SUCCESS": (r"tensor 'my_tensor_0'.*end past the end", "t0"),
    "TENSORS_CUSTOM_ALIGN": (r"tensor 'my_tensor_0'.*end past the end", "t0"),
    "DATA_NOT_ENOUGH_DATA": (r"tensor 'my_tensor_11'.*end past the end", "t11"),
    "DATA_BAD_ALIGN": (r"general.alignment.*13 is not a power of two", "alignment.value"),
    "DATA_INCONSISTENT_ALIGN": (r"data offset of tensor 'my_tensor_\d+'.*not a multiple of the alignment 32", None),
    "DATA_MEM_SIZE_OVERFLOW": (r"type of tensor 'my_tensor_0'.*I8 is not supported", "t0.type"),
    "DATA_MEM_SIZE_OVERFLOW_F32": (r"tensor 'my_tensor_0'.*9223372036854775552 bytes.*end past the end", "t0"),
}
LOADS = {"HEADER_EMPTY", "KV_SUCCESS", "DATA_SUCCESS", "DATA_CUSTOM_ALIGN"}
assert set(REFUSALS) | LOADS == set(HANDCRAFTED_KINDS)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", HANDCRAFTED_KINDS)
def test_llama_cpp_handcrafted(kind, seed, tmp_path):
    h = handcrafted(kind, seed)
    if kind in LOADS:
        with load(tmp_path, h.data) as f:
            assert f.metadata == h.metadata
            assert f.alignment == h.alignment
            assert list(f.tensors) == list(h.tensors)
            for name, (qtype, ne, rel_offset, nbytes) in h.tensors.items():
                info = f.tensors[name]
                assert (info.qtype, info.ne, info.nbytes) == (qtype, ne, nbytes)
                assert info.offset == f.data_offset + rel_offset
                # the generator filled the data section with byte j = j % 256
                assert tensor_bytes(f, name) == bytes((rel_offset + j) % 256 for j in range(nbytes))
            assert_matches_gguf_py(f, tmp_path / "x.gguf")
        return
    pattern, label = REFUSALS[kind]
    if label is None:  # the first tensor whose offset is off the 32-byte grid
        label = next(f"t{i}.offset" for i, t in enumerate(h.tensors.values()) if t[2] % 32)
    refuse(tmp_path, h.data, pattern, h.at[label])


# ---------------------------------------------------------------------------
# further malformations


def tiny(kvs=(), tensors=(("w", [32, 2], F32, 0),), data: int | None = None, n_kv=None, n_tensors=None,
         version=3, alignment=32) -> RawGGUF:
    """A small file: given KVs, tensor infos, padding and `data` bytes of tensor data."""
    w = RawGGUF()
    w.header(len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv, version)
    for i, (key, vtype, value, sub) in enumerate(kvs):
        w.kv(key, vtype, value, sub, label=f"kv{i}")
    for i, (name, ne, qtype, offset) in enumerate(tensors):
        w.tensor_info(name, ne, qtype, offset, label=f"t{i}")
    w.pad(alignment)
    w.mark("data")
    if data is None:
        data = sum(-(-(4 * ne[0] * (ne[1] if len(ne) > 1 else 1)) // alignment) * alignment for _, ne, _, _ in tensors)
    w.raw(bytes(data))
    return w


def test_tiny_file_loads(tmp_path):
    w = tiny(kvs=[("general.architecture", VT.STRING, "llama", None)])
    with load(tmp_path, w.getvalue()) as f:
        assert f.metadata == {"general.architecture": "llama"}
        assert f.tensors["w"].offset == w.at["data"]


@pytest.mark.parametrize("size", [0, 1, 4, 23])
def test_file_shorter_than_header(size, tmp_path):
    refuse(tmp_path, (b"GGUF\x03\x00\x00\x00" + bytes(16))[:size],
           rf"file is {size} bytes, shorter than the 24-byte GGUF header")


def test_byte_swapped_version(tmp_path):
    w = tiny()
    data = bytearray(w.getvalue())
    data[4:8] = struct.pack(">I", 3)
    refuse(tmp_path, bytes(data), r"version.*0x03000000 looks byte-swapped.*big-endian", 4)


def test_truncated_tensor_data(tmp_path):
    data = tiny().getvalue()
    refuse(tmp_path, data[:-1], r"tensor 'w'.*256 bytes at data offset 0.*end past the end", tiny().at["t0"])


def test_nested_array(tmp_path):
    w = tiny(kvs=[("a", VT.ARRAY, [], VT.ARRAY)])
    refuse(tmp_path, w.getvalue(), r"array value of metadata key 'a'.*nested arrays", w.at["kv0.sub"])


def test_unknown_array_element_type(tmp_path):
    w = tiny(kvs=[("a", VT.ARRAY, [], 13)])
    refuse(tmp_path, w.getvalue(), r"element type of array value of metadata key 'a'.*unknown GGUF value type 13",
           w.at["kv0.sub"])


def test_array_count_beyond_file(tmp_path):
    w = tiny(kvs=[("a", VT.ARRAY, [1, 2], VT.INT32)])
    data = bytearray(w.getvalue())
    data[w.at["kv0.count"]:w.at["kv0.count"] + 8] = struct.pack("<Q", 1000)
    refuse(tmp_path, bytes(data), r"element count of array value of metadata key 'a'.*1000 elements of INT32 need "
           r"at least 4000 bytes", w.at["kv0.count"])


@pytest.mark.parametrize("count", [2**24 + 1, 2**60, 2**64 - 1])
def test_huge_array_counts_fail_without_allocating(count, tmp_path):
    """A 200-byte file declaring 2^60 elements: refused in milliseconds, allocating nothing."""
    for sub in (VT.UINT8, VT.STRING, VT.FLOAT64):
        w = tiny(kvs=[("a", VT.ARRAY, [], sub)])
        data = bytearray(w.getvalue())
        data[w.at["kv0.count"]:w.at["kv0.count"] + 8] = struct.pack("<Q", count)
        tracemalloc.start()
        refuse(tmp_path, bytes(data), r"element count of array value of metadata key 'a'", w.at["kv0.count"])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20


def test_string_array_element_beyond_file(tmp_path):
    w = tiny(kvs=[("a", VT.ARRAY, ["xy", "z"], VT.STRING)], tensors=())
    data = bytearray(w.getvalue())
    first = w.at["kv0.count"] + 8
    data[first:first + 8] = struct.pack("<Q", 10_000)
    refuse(tmp_path, bytes(data), r"length of element 0 of array value of metadata key 'a'.*10000 bytes exceeds",
           first)


def test_string_array_cut_inside_a_length(tmp_path):
    # two elements declared, the file ends 3 bytes into the second length
    w = RawGGUF()
    w.header(0, 1)
    w.kv("a", VT.ARRAY, ["abcde"], VT.STRING, label="kv0")  # 8 + 5 + 3 bytes pass the count x 8 bound
    data = bytearray(w.getvalue())
    data[w.at["kv0.count"]:w.at["kv0.count"] + 8] = struct.pack("<Q", 2)
    data += b"\x01\x00\x00"
    refuse(tmp_path, bytes(data), r"length of element 1 of array value of metadata key 'a'.*needs 8 bytes but only 3",
           len(data) - 3)


def test_string_longer_than_cap(tmp_path):
    w = tiny(kvs=[("s", VT.STRING, "abc", None)])
    data = bytearray(w.getvalue())
    at = w.at["kv0.type"] + 4
    data[at:at + 8] = struct.pack("<Q", MAX_STRING_BYTES + 1)
    refuse(tmp_path, bytes(data), rf"length of string value of metadata key 's'.*{MAX_STRING_BYTES + 1} bytes "
           rf"exceeds the limit of {MAX_STRING_BYTES}", at)


def test_string_longer_than_file(tmp_path):
    w = tiny(kvs=[("s", VT.STRING, "abc", None)], tensors=())
    data = bytearray(w.getvalue())
    at = w.at["kv0.type"] + 4
    data[at:at + 8] = struct.pack("<Q", 1000)
    refuse(tmp_path, bytes(data), r"string value of metadata key 's'.*needs 1000 bytes but only \d+ remain", at + 8)


@pytest.mark.parametrize("where", ["key", "value", "array element", "tensor name"])
def test_invalid_utf8(where, tmp_path):
    bad = b"ab\xff\xfe"
    kvs = {"key": [(bad, VT.UINT8, 1, None)],
           "value": [("k", VT.STRING, bad, None)],
           "array element": [("k", VT.ARRAY, ["ok", bad], VT.STRING)]}.get(where, [])
    tensors = [(bad if where == "tensor name" else "w", [32], F32, 0)]
    w = tiny(kvs=kvs, tensors=tensors)
    what = {"key": "key of metadata entry #0", "value": "string value of metadata key 'k'",
            "array element": "element 1 of array value of metadata key 'k'",
            "tensor name": "name of tensor info #0"}[where]
    refuse(tmp_path, w.getvalue(), rf"{what} at byte offset \d+: not valid UTF-8")


@pytest.mark.parametrize("value,vtype,problem", [
    (0, VT.UINT32, "0 is not a power of two"),
    (48, VT.UINT32, "48 is not a power of two"),
    (1 << 21, VT.UINT32, "2097152 is not a power of two in 1..1048576"),
    (32, VT.UINT64, "must be of type UINT32, found UINT64"),
])
def test_bad_alignment(value, vtype, problem, tmp_path):
    w = tiny(kvs=[("general.alignment", vtype, value, None)])
    refuse(tmp_path, w.getvalue(), rf"metadata key 'general.alignment'.*{problem}")


def test_alignment_as_array(tmp_path):
    w = tiny(kvs=[("general.alignment", VT.ARRAY, [32], VT.UINT32)])
    refuse(tmp_path, w.getvalue(), r"general.alignment.*must be of type UINT32, found ARRAY", w.at["kv0.type"])


def test_custom_alignment_loads(tmp_path):
    w = tiny(kvs=[("general.alignment", VT.UINT32, 64, None)], tensors=(("a", [32], F32, 0), ("b", [32], F32, 128)),
             alignment=64, data=256)
    with load(tmp_path, w.getvalue()) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert f.tensors["b"].offset == f.data_offset + 128
        assert_matches_gguf_py(f, tmp_path / "x.gguf")


def test_unaligned_float_tensor_with_alignment_1(tmp_path):
    """With general.alignment 1 an F32 tensor may sit at an odd byte: the view is then an aligned copy."""
    w = RawGGUF()
    w.header(2, 1)
    w.kv("general.alignment", VT.UINT32, 1)
    w.tensor_info("q", [32], Q8_0, 0)
    w.tensor_info("f", [4], F32, 34)
    w.mark("data")
    w.raw(bytes(34) + struct.pack("<4f", 1.0, -2.0, 3.5, 0.25))
    with load(tmp_path, w.getvalue()) as f:
        assert f.tensors["f"].offset % 4 != 0
        assert f.quant_tensor("f").data.tolist() == [[1.0, -2.0, 3.5, 0.25]]
        assert_matches_gguf_py(f, tmp_path / "x.gguf")


def test_empty_tensor_name(tmp_path):
    w = tiny(tensors=(("", [32], F32, 0),))
    refuse(tmp_path, w.getvalue(), r"name length of tensor info #0.*0 bytes, must be 1..63", w.at["t0"])


def test_n_dims_zero(tmp_path):
    w = RawGGUF()
    w.header(1, 0)
    w.tensor_info("w", [], F32, 0, label="t0")
    w.raw(bytes(64))
    refuse(tmp_path, w.getvalue(), r"n_dims of tensor 'w'.*0, must be 1..4", w.at["t0.n_dims"])


def test_huge_dims_fail_fast(tmp_path):
    """2^60 elements of F32 in a 200-byte file: refused, nothing allocated."""
    w = tiny(tensors=(("w", [2**30, 2**30], F32, 0),), data=64)
    tracemalloc.start()
    refuse(tmp_path, w.getvalue(), r"tensor 'w'.*4611686018427387904 bytes at data offset 0.*end past the end",
           w.at["t0"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_dims_product_at_2_63(tmp_path):
    w = tiny(tensors=(("w", [2**32, 2**31], F32, 0),), data=64)
    refuse(tmp_path, w.getvalue(), r"shape of tensor 'w'.*9223372036854775808 elements, at least 2\^63", w.at["t0.ne0"])


def test_unsupported_known_type(tmp_path):
    w = tiny(tensors=(("blk.0.attn_q.weight", [256, 2], int(GGMLType.IQ2_XXS), 0),), data=256)
    refuse(tmp_path, w.getvalue(), r"type of tensor 'blk.0.attn_q.weight'.*IQ2_XXS is not supported by this runtime",
           w.at["t0.type"])


def test_row_not_a_multiple_of_block(tmp_path):
    w = tiny(tensors=(("w", [48, 2], Q8_0, 0),), data=256)
    refuse(tmp_path, w.getvalue(), r"shape of tensor 'w'.*ne\[0\]=48 is not a multiple of the Q8_0 block size 32",
           w.at["t0.ne0"])


def test_overlapping_tensors(tmp_path):
    w = tiny(tensors=(("a", [32, 2], F32, 0), ("b", [32], F32, 128)), data=256)
    refuse(tmp_path, w.getvalue(), r"tensor 'b' at byte offset \d+ overlaps tensor 'a'")


def test_overlap_found_whatever_the_order(tmp_path):
    w = tiny(tensors=(("late", [32], F32, 64), ("early", [32, 2], F32, 0)), data=256)
    refuse(tmp_path, w.getvalue(), r"tensor 'late' at byte offset \d+ overlaps tensor 'early'")


def test_tensors_out_of_order_but_disjoint_load(tmp_path):
    w = tiny(tensors=(("second", [32], F32, 128), ("first", [32], F32, 0)), data=256)
    with load(tmp_path, w.getvalue()) as f:
        assert list(f.tensors) == ["second", "first"]
        assert f.tensors["second"].offset == f.data_offset + 128


@pytest.mark.parametrize("offset", [2**64 - 32, 2**63, 4096])
def test_offset_outside_file(offset, tmp_path):
    w = tiny(tensors=(("w", [32], F32, offset),), data=128)
    refuse(tmp_path, w.getvalue(), rf"tensor 'w'.*at data offset {offset}.*end past the end", w.at["t0"])


def test_counts_bounded_by_smallest_records(tmp_path):
    """One 14-byte KV (the smallest possible) fits exactly; declaring two does not."""
    w = RawGGUF()
    w.header(0, 1)
    w.kv("k", VT.UINT8, 5)
    assert len(w.getvalue()) == 24 + 14
    with load(tmp_path, w.getvalue()) as f:
        assert f.metadata == {"k": 5}
    data = bytearray(w.getvalue())
    data[16:24] = struct.pack("<Q", 2)
    refuse(tmp_path, bytes(data), r"n_tensors/n_kv.*0 tensors and 2 metadata entries need at least 28 bytes, "
           r"but only 14 follow", 8)


# ---------------------------------------------------------------------------
# sweeps over the golden file


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return write_golden(tmp_path_factory.mktemp("gguf") / "golden.gguf")


def test_truncation_sweep(golden, tmp_path):
    """Every prefix that cuts the header, metadata, tensor infos or any tensor's bytes is refused."""
    data = Path(golden.path).read_bytes()
    with GGUFFile(golden.path) as f:
        end_of_tensors = max(t.offset + t.nbytes for t in f.tensors.values())
        data_offset = f.data_offset
    slowest = 0.0
    for n in range(end_of_tensors):
        path = tmp_path / f"cut{n}.gguf"
        path.write_bytes(data[:n])
        err, seconds = open_timed(path)
        assert isinstance(err, GGUFError), n
        slowest = max(slowest, seconds)
        path.unlink()
    print(f"\ntruncation sweep: {end_of_tensors} prefixes refused ({data_offset} of them inside header/metadata/"
          f"tensor infos), slowest {slowest * 1e3:.2f} ms CPU")
    assert slowest < 0.1
    (tmp_path / "whole.gguf").write_bytes(data[:end_of_tensors])  # trailing padding is not needed
    GGUFFile(tmp_path / "whole.gguf").close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _interesting(rng: random.Random, width: int, orig: int, file_size: int, field_at: int) -> list[int]:
    top = 2 ** (8 * width)
    picks = [0, 1, 2, 3, 4, 7, 8, 13, 31, 32, 33, 63, 64, 65, 255, 256, 4095, 65535,
             2**31 - 1, 2**31, 2**32 - 1]
    if width == 8:
        picks += [2**32, 2**48, 2**60, 2**62, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]
    picks += [orig - 1, orig + 1, orig * 2, orig ^ (1 << rng.randrange(8 * width)), file_size, file_size - field_at]
    picks += [rng.randrange(top) for _ in range(4)] + [rng.randrange(4096) for _ in range(4)]
    return sorted({p % top for p in picks} - {orig})


def test_random_count_and_length_sweep(golden, tmp_path):
    """Every count/length/type/dim/offset field, set to extreme and random values, alone and in pairs."""
    data = Path(golden.path).read_bytes()
    slots = golden_field_slots(golden.path)
    rng = random.Random(20240607)

    def read(slot):
        return int.from_bytes(data[slot.offset:slot.offset + slot.width], "little")

    cases: list[list[tuple]] = []
    for slot in slots:
        for v in _interesting(rng, slot.width, read(slot), len(data), slot.offset):
            cases.append([(slot, v)])
    for _ in range(1000):
        a, b = rng.sample(slots, 2)
        cases.append([(s, rng.choice(_interesting(rng, s.width, read(s), len(data), s.offset))) for s in (a, b)])

    tried = refused = loaded = 0
    slowest, slowest_case = 0.0, None
    rss0 = _rss_bytes()
    rss_peak = rss0
    tracemalloc.start()
    t_start = time.perf_counter()
    for i, mutation in enumerate(cases):
        buf = bytearray(data)
        for slot, v in mutation:
            buf[slot.offset:slot.offset + slot.width] = v.to_bytes(slot.width, "little")
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(buf)
        tried += 1
        f, seconds = open_timed(path)
        if isinstance(f, GGUFError):
            refused += 1
            if seconds > slowest:
                slowest, slowest_case = seconds, [(s.label, v) for s, v in mutation]
        else:
            loaded += 1
            with f:
                assert_matches_gguf_py(f, path)
        path.unlink()
        if i % 16 == 0:
            rss_peak = max(rss_peak, _rss_bytes())
    elapsed = time.perf_counter() - t_start
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\nfield sweep: {len(slots)} fields, {tried} files tried, {refused} refused, {loaded} loaded "
          f"(each equal to gguf-py's reading), slowest refusal {slowest * 1e3:.2f} ms CPU {slowest_case}, "
          f"tracemalloc peak {traced_peak / 2**20:.2f} MiB, RSS growth {(rss_peak - rss0) / 2**20:.1f} MiB, "
          f"{elapsed:.1f} s")
    assert tried > 3000 and refused > 0 and loaded > 0
    assert slowest < 0.1
    assert traced_peak < 50 << 20 and rss_peak - rss0 < 50 << 20
