"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

`GraphRunner(model, max_num_seqs).run(batch) -> logits` is what the engine calls in
place of `model.forward(batch)` (CUDA, backend "triton"):

- A pure decode step (max_query_len == 1, one token per sequence, no embeddings) of B
  sequences is padded to its bucket (1, 2, 4, 8, ... up to max_num_seqs): padding rows
  have slot -1 (their K/V are written nowhere) and seq_len 0 (their attention is zeros,
  never NaN), token 0 at position 0.
- Every Batch field lives in a static buffer sized for max_num_seqs rows, allocated once;
  a step copies into the first rows and resets the padding rows, never rebinds a
  buffer, then replays the bucket's graph (captured on the bucket's first use). The
  KV pool is the model's own; the graph captures its pointers, so the pool must not be
  reallocated after the runner is built.
- Prefill and mixed steps, and anything else the static buffers cannot hold, run
  eagerly: `model.forward(batch)`.

A graph needs every op of the step to be capturable: no host reads and no
data-dependent shapes. The Triton ops are (attention reads lengths and block tables on
the device, its split count follows the block table's width). The torch reference's
attention reads lengths on the host, so graphs are for backend "triton"; with
use_graph=False (the CPU) the same static-buffer step runs eagerly, which is what the
CPU tests check. Sampling stays outside the graph (smollm3_triton.sampling).
"""
from __future__ import annotations

import warnings

import torch

from ..model import Batch, Transformer

# Warm-up runs on a side stream before capture: compiles the Triton kernels and lets the
# caching allocator settle, as torch.cuda.graphs recommends.
WARMUP_RUNS = 2


def buckets_for(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... below max_num_seqs, then max_num_seqs itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


class GraphRunner:
    def __init__(self, model: Transformer, max_num_seqs: int, *, use_graph: bool | None = None):
        if model.cache is None:
            raise ValueError("GraphRunner needs the model's KV cache allocated first (model.allocate_cache)")
        self.model = model
        self.device = model.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.max_num_seqs = max_num_seqs
        self.buckets = buckets_for(max_num_seqs)
        bs = model.cache.block_size
        self.max_blocks = -(-model.max_seq_len // bs)
        M, dev = max_num_seqs, self.device

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=dev)

        # The static inputs: every replay reads exactly these tensors.
        self.token_ids = zeros(M)
        self.positions = zeros(M)
        self.slot_mapping = torch.full((M,), -1, dtype=torch.int64, device=dev)
        self.query_start = torch.arange(M + 1, dtype=torch.int32, device=dev)   # one query per row, always
        self.seq_lens = zeros(M, dtype=torch.int32)
        self.block_tables = zeros(M, self.max_blocks, dtype=torch.int32)
        self.logits_rows = torch.arange(M, dtype=torch.int64, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._eager_buckets: set[int] = set()      # capture failed: run the step eagerly
        self._pool = None

    # ------------------------------------------------------------------ the step
    def static_batch(self, bucket: int) -> Batch:
        """The Batch a bucket's graph runs: views of the first `bucket` rows of the buffers."""
        return Batch(token_ids=self.token_ids[:bucket], positions=self.positions[:bucket],
                     slot_mapping=self.slot_mapping[:bucket], query_start=self.query_start[:bucket + 1],
                     seq_lens=self.seq_lens[:bucket], block_tables=self.block_tables[:bucket],
                     max_query_len=1, logits_rows=self.logits_rows[:bucket])

    def bucket_for(self, batch: Batch) -> int | None:
        """The bucket a batch replays in, or None when it must run eagerly."""
        B = batch.seq_lens.shape[0]
        if batch.max_query_len != 1 or batch.embeds is not None or not 1 <= B <= self.max_num_seqs \
                or batch.token_ids.shape[0] != B or batch.block_tables.shape[1] > self.max_blocks:
            return None
        return next(b for b in self.buckets if b >= B)

    def load(self, batch: Batch, bucket: int) -> None:
        """Copy a decode batch into the static buffers and reset rows B..bucket to padding."""
        B, width = batch.seq_lens.shape[0], batch.block_tables.shape[1]
        self.token_ids[:B].copy_(batch.token_ids, non_blocking=True)
        self.positions[:B].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:B].copy_(batch.slot_mapping, non_blocking=True)
        self.seq_lens[:B].copy_(batch.seq_lens, non_blocking=True)
        self.block_tables[:B, :width].copy_(batch.block_tables, non_blocking=True)
        if width < self.max_blocks:
            self.block_tables[:B, width:].zero_()
        self.pad(B, bucket)

    def pad(self, start: int, stop: int) -> None:
        self.token_ids[start:stop].zero_()
        self.positions[start:stop].zero_()
        self.slot_mapping[start:stop].fill_(-1)
        self.seq_lens[start:stop].zero_()
        self.block_tables[start:stop].zero_()

    def run(self, batch: Batch) -> torch.Tensor:
        """logits [len(batch.logits_rows), vocab] float32, as model.forward(batch) returns."""
        bucket = self.bucket_for(batch)
        if bucket is None:
            return self.model.forward(batch)
        self.load(batch, bucket)
        if not self.use_graph or bucket in self._eager_buckets:
            logits = self.model.forward(self.static_batch(bucket))
        else:
            if bucket not in self._graphs:
                self.capture(bucket)
            if bucket in self._graphs:
                self._graphs[bucket].replay()
                logits = self._outputs[bucket]
            else:
                logits = self.model.forward(self.static_batch(bucket))
        # A fresh tensor (the graph's output is overwritten by the next replay).
        return logits[batch.logits_rows]

    __call__ = run

    # ------------------------------------------------------------------ capture
    def capture(self, bucket: int) -> None:
        """Capture a bucket's step. The static rows are padding while it runs (warm-up and
        capture write no K/V: slot -1), and are restored by the next load."""
        B = bucket
        saved = [t[:B].clone() for t in (self.token_ids, self.positions, self.slot_mapping, self.seq_lens,
                                          self.block_tables)]
        self.pad(0, B)
        batch = self.static_batch(B)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    self.model.forward(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.model.forward(batch)
        except RuntimeError as e:
            # A step that cannot be captured still runs, only slower: say so when it happens.
            warnings.warn(f"CUDA graph capture of the {B}-sequence decode step failed ({e}); "
                          f"running it eagerly", stacklevel=3)
            torch.cuda.synchronize(self.device)
            self._eager_buckets.add(B)
        else:
            self._graphs[B], self._outputs[B] = graph, out
        finally:
            for t, s in zip((self.token_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables),
                            saved):
                t[:B].copy_(s)

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (its memory then serves the smaller ones)."""
        if not self.use_graph:
            return
        with torch.inference_mode():
            for b in reversed(self.buckets):
                if b not in self._graphs and b not in self._eager_buckets:
                    self.capture(b)

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)
