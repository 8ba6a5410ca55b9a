"""Hypothesis fuzz target for GGUFFile: mutate the golden file and require a
clean GGUFError or a clean load (every tensor readable inside the file, the
parse equal to gguf-py's).

CI runs FUZZ_EXAMPLES (default 300) derandomized examples; for a long run:
    FUZZ_EXAMPLES=100000 pytest tests/fuzz_gguf.py
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smollm3_triton.errors import GGUFError
from smollm3_triton.gguf.reader import GGUFFile
from tests.helpers.cpu_time import own_cpu_seconds
from tests.helpers.gguf_cases import assert_matches_gguf_py, golden_field_slots, write_golden

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))

_EXTREMES = [0, 1, 2, 31, 32, 33, 63, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**60,
             2**63 - 1, 2**63, 2**64 - 1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    golden = write_golden(tmp / "golden.gguf")
    data = Path(golden.path).read_bytes()
    slots = golden_field_slots(golden.path)
    n = len(data)
    byte_writes = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=16)
    field_writes = st.lists(
        st.tuples(st.sampled_from(slots), st.sampled_from(_EXTREMES) | st.integers(0, 2**64 - 1)),
        min_size=1, max_size=3)
    truncation = st.integers(0, n - 1)
    splice = st.tuples(st.integers(0, n), st.integers(0, 64), st.binary(max_size=64))
    mutation = st.one_of(
        st.tuples(st.just("bytes"), byte_writes),
        st.tuples(st.just("fields"), field_writes),
        st.tuples(st.just("truncate"), truncation),
        st.tuples(st.just("splice"), splice),
    )
    return tmp, data, mutation, itertools.count()


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    buf = bytearray(data)
    if kind == "bytes":
        for at, value in arg:
            buf[at] = value
    elif kind == "fields":
        for slot, value in arg:
            buf[slot.offset:slot.offset + slot.width] = (value % 2 ** (8 * slot.width)).to_bytes(slot.width, "little")
    elif kind == "truncate":
        del buf[arg:]
    else:  # splice: replace `cut` bytes at `at` with `insert`
        at, cut, insert = arg
        buf[at:at + cut] = insert
    return bytes(buf)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(draw=st.data())
def test_fuzz_gguf(corpus, draw):
    tmp, data, mutation_strategy, counter = corpus
    mutation = draw.draw(mutation_strategy, label="mutation")
    # a fresh name per example: a file still mapped must never be rewritten under us
    path = tmp / f"fuzz{next(counter)}.gguf"
    path.write_bytes(mutate(data, mutation))
    try:
        with own_cpu_seconds() as cpu:
            f = GGUFFile(path)
    except GGUFError as e:
        event(f"refused ({mutation[0]})")
        assert str(path) in str(e)
        assert cpu.seconds < 0.1
        path.unlink()
        return
    event(f"loaded ({mutation[0]})")
    with f:
        size = path.stat().st_size
        for name, info in f.tensors.items():
            assert f.data_offset <= info.offset and info.offset + info.nbytes <= size
            q = f.quant_tensor(name)
            assert q.data.reshape(-1).view(torch.uint8).numel() == info.nbytes
            q.data.reshape(-1).view(torch.uint8).sum()  # touches every byte: a bad mapping would fault here
        assert_matches_gguf_py(f, path)
    path.unlink()  # unlinking (unlike rewriting) leaves live mappings valid
