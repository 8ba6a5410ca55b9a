"""Runtime.load refuses bad device / backend / dtype arguments before reading weights."""
import pytest
import torch

from smollm3_triton import RequestError, Runtime


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="blah"), "device 'blah' is not a valid device"),
    (dict(backend="tpu"), "backend must be one of"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(dtype=torch.int32), "dtype must be float32, bfloat16 or float16"),
])
def test_bad_load_arguments(smollm2_path, kwargs, message):
    with pytest.raises(RequestError, match=message):
        Runtime.load(smollm2_path, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda(smollm2_path):
    with pytest.raises(RequestError, match="CUDA is not available"):
        Runtime.load(smollm2_path, device="cuda")
