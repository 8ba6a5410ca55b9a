"""embedding_triton (token rows of a quantized embedding + their inv_rms) against independent oracles.

Oracle for the rows: gguf-py's dequantization of the same blocks (tests/helpers/quant_samples.py),
rounded to the activation dtype: the kernel computes each weight exactly (int * mul + bias in
fp32, exact for these types) and rounds once, so the rows must match bit for bit. inv_rms:
1 / sqrt(mean(h^2) + eps) of those rows in float64, within fp32 rounding (1e-6 relative).
Without CUDA the kernel runs under TRITON_INTERPRET=1.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from smollm3_triton.errors import KernelInputError  # noqa: E402
from smollm3_triton.gguf.constants import GGMLType  # noqa: E402
from smollm3_triton.kernels.embedding import embedding_torch, embedding_triton  # noqa: E402
from smollm3_triton.kernels.qtiles import prepare_tiles  # noqa: E402
from tests.helpers.quant_samples import ALL_TYPES, oracle_matrix, random_weight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6

pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_to_nearest")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_rows_and_statistics(qtype):
    k = {GGMLType.Q4_K: 512, GGMLType.Q5_K: 512, GGMLType.Q6_K: 512}.get(qtype, 576 if qtype.name[0] == "Q" else 200)
    w = random_weight(qtype, 50, k, seed=1)
    table = prepare_tiles(w.to(DEVICE))
    ids = torch.tensor([3, 49, 0, 3, 17, 8, 9, 10, 11, 12, 40])      # 11 tokens: one full program of 8 and a partial
    for dtype in (torch.float32, torch.bfloat16):
        h, inv = embedding_triton(ids.to(DEVICE), table, dtype, EPS)
        expected = oracle_matrix(w)[ids].to(dtype)
        assert torch.equal(h.cpu(), expected), (qtype.name, dtype)
        ref_inv = 1 / (expected.double().pow(2).mean(-1) + EPS).sqrt()
        torch.testing.assert_close(inv.cpu().double(), ref_inv, rtol=1e-6, atol=0)
        h_ref, inv_ref = embedding_torch(ids, w, dtype, EPS)
        assert torch.equal(h_ref, expected)


def test_empty_and_bad_input():
    table = prepare_tiles(random_weight(GGMLType.Q8_0, 8, 64).to(DEVICE))
    h, inv = embedding_triton(torch.zeros(0, dtype=torch.int64, device=DEVICE), table, torch.float32, EPS)
    assert h.shape == (0, 64) and inv.shape == (0,)
    with pytest.raises(KernelInputError, match="1-D int tensor"):
        embedding_triton(torch.zeros(2, 2, dtype=torch.int64, device=DEVICE), table, torch.float32, EPS)
