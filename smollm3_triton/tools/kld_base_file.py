"""llama.cpp's `--kl-divergence-base` file: the log-probabilities of every scored token over
the whole vocabulary, written by one model and read back to compare another against it.

The layout (tools/perplexity/perplexity.cpp), little-endian, so files written here are read
by llama-perplexity and the other way round:

    b"_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx],
    then per scored token nv = 2 * ceil(n_vocab / 2) + 4 uint16 values: float32 scale and
    float32 min_log_prob (4 uint16), then each logit as round((logit - min_logit) / scale),
    min_logit = max(min, max - 16), scale = (max - min_logit) / 65535.

That is 2 bytes per vocabulary entry per token (~25 MB per 512-token chunk at 49152 tokens).
The scored tokens are the second half of each chunk: positions first .. ctx - 2 predict
tokens first + 1 .. ctx - 1, first = ctx // 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import RequestError, SourceNotFoundError
from . import MIN_CTX

MAGIC = b"_logits_"
HEADER_BYTES = 20           # magic, n_ctx, n_vocab, n_chunk


def scored_rows(ctx: int) -> tuple[int, int]:
    """(first, n): the logits rows first .. first + n - 1 of a chunk are scored."""
    first = ctx // 2
    return first, ctx - 1 - first


def row_width(n_vocab: int) -> int:
    """uint16 values per scored token: the 4 of the float32 header, then the vocabulary padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_rows(rows: torch.Tensor, targets: torch.Tensor, nv: int) -> tuple[np.ndarray, torch.Tensor]:
    """float32 logits [n, V] -> their uint16 rows [n, nv] and the NLL of the targets as
    llama.cpp computes it while writing (in float32, returned as float64)."""
    rows = rows.float()
    n, V = rows.shape
    mx = rows.max(dim=-1).values
    mn = torch.maximum(rows.min(dim=-1).values, mx - 16)
    lse = torch.log(torch.exp(rows - mx[:, None]).double().sum(dim=-1)).float()
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / 65535.0
    inv = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    q = torch.round(inv[:, None] * (rows - mn[:, None]))
    q = torch.where(rows > mn[:, None], q, 0.0).to(torch.int32) & 0xFFFF   # C's uint16 store wraps
    out = np.zeros((n, nv), dtype=np.uint16)
    header = torch.stack([scale, min_log_prob], dim=1).cpu().numpy().astype("<f4")
    out[:, :4] = header.view("<u2").reshape(n, 4)
    out[:, 4:4 + V] = q.cpu().numpy().astype(np.uint16)
    nll = (mx + lse) - rows.gather(1, targets[:, None]).squeeze(1)
    return out, nll.double()


def decode_rows(base_rows: np.ndarray, n_vocab: int, device) -> torch.Tensor:
    """uint16 rows [n, nv] -> the log-probabilities [n, n_vocab] they encode (float32)."""
    n = base_rows.shape[0]
    header = np.ascontiguousarray(base_rows[:, :4]).view("<f4").reshape(n, 2)
    scale = torch.from_numpy(header[:, 0].astype(np.float32)).to(device)
    min_log_prob = torch.from_numpy(header[:, 1].astype(np.float32)).to(device)
    q = torch.from_numpy(base_rows[:, 4:4 + n_vocab].astype(np.int32)).to(device)
    return scale[:, None] * q.float() + min_log_prob[:, None]


class BaseFileWriter:
    """Writes the file chunk by chunk as the chunks are scored; the header goes out with the
    first rows (n_vocab is the logits' width). Used as a context manager: a run that fails
    leaves no half-written file behind."""

    def __init__(self, path: str | Path, ctx: int, n_chunk: int, tokens: Sequence[int]):
        self.path, self.ctx, self.n_chunk = Path(path), ctx, n_chunk
        self._tokens = tokens[:n_chunk * ctx]
        self._nv: int | None = None
        self._file = open(self.path, "wb")

    def add(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One chunk's scored logits rows [n, V]; -> the targets' NLL (float64) as llama.cpp writes it."""
        if self._nv is None:
            n_vocab = rows.shape[1]
            self._nv = row_width(n_vocab)
            self._file.write(MAGIC)
            self._file.write(np.array([self.ctx], "<u4").tobytes())
            self._file.write(np.array([n_vocab, self.n_chunk], "<i4").tobytes())
            self._file.write(np.asarray(self._tokens, "<i4").tobytes())
        q, nll = encode_rows(rows, targets, self._nv)
        self._file.write(q.tobytes())
        return nll

    def __enter__(self) -> BaseFileWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._file.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)


@dataclass
class BaseFile:
    path: Path
    ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray       # int32 [n_chunk * ctx]
    rows: np.ndarray         # uint16 memmap [n_chunk * scored tokens per chunk, nv]

    def chunk_rows(self, i: int) -> np.ndarray:
        """The uint16 rows of chunk i's scored tokens."""
        n = scored_rows(self.ctx)[1]
        return np.asarray(self.rows[i * n:(i + 1) * n])


def read_base_file(path: str | Path) -> BaseFile:
    """A base file, checked against its own header before any row is read."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path}: no such base file (write one with --kl-divergence-base "
                                  f"and no --kl-divergence)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise RequestError(f"{path} does not look like a file of log-probabilities (no {MAGIC!r} header)")
    ctx = int(np.frombuffer(head, "<u4", 1, 8)[0])
    n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, "<i4", 2, 12))
    if ctx < MIN_CTX or n_vocab < 1 or n_chunk < 1:
        raise RequestError(f"{path}: bad header (n_ctx {ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
    nv = row_width(n_vocab)
    n_rows = n_chunk * scored_rows(ctx)[1]
    want = HEADER_BYTES + 4 * n_chunk * ctx + 2 * nv * n_rows
    if size != want:
        raise RequestError(f"{path}: {size} bytes, but its header (n_ctx {ctx}, n_vocab {n_vocab}, "
                           f"{n_chunk} chunks) needs {want}: truncated or not a base file")
    tokens = np.fromfile(path, "<i4", n_chunk * ctx, offset=HEADER_BYTES)
    rows = np.memmap(path, "<u2", "r", offset=HEADER_BYTES + 4 * n_chunk * ctx, shape=(n_rows, nv))
    return BaseFile(path, ctx, n_vocab, n_chunk, tokens, rows)
