"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A graph replays a whole decode step of `bucket` rows:

    staging [7, bucket] (host ids, in-flight rows, positions, KV slots, lengths, table updates)
      -> token ids: the host's, or the row's last drawn token for one still in flight
      -> block-table entries of new blocks written; the batch's static tensors filled
      -> model.forward -> logits [bucket, vocab] (the graph's own buffer, never copied)
      -> the sampling kernel over rows 0..bucket-1 -> tokens [bucket]

so a step is one host-to-device copy of the staging, one replay, and one copy of the
tokens back. With the engine's persistent state (input_batch.InputBatch) the block tables
and the sampling state are its own: batch row b is state row b, which holds when the step
decodes every running sequence (rows are dense). Padding rows have slot -1 (their K/V are
written nowhere), length 0 (their attention is zeros, never NaN), token 0 at position 0;
their state rows are free ones, left greedy (one cheap pass) when a sequence leaves them.
Prefill and mixed steps, and anything else the static buffers cannot hold, run eagerly.

`GraphRunner(model, max_num_seqs).run(batch) -> logits` (no persistent state: its own
block tables, no sampling) replays the same step for a given decode Batch; the tests use it.

A graph needs every op of the step to be capturable: no host reads and no data-dependent
shapes. The Triton ops are (attention reads lengths and block tables on the device, its
split count follows the block table's width). The torch reference's attention reads
lengths on the host, so graphs are for backend "triton"; with use_graph=False (the CPU)
the same static-buffer step runs eagerly, which is what the CPU tests check.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..model import Batch, Transformer
from .sampler import sampler_for

if TYPE_CHECKING:
    from .input_batch import InputBatch, StepInputs

# Warm-up runs on a side stream before capture: compiles the Triton kernels and lets the
# caching allocator settle, as torch.cuda.graphs recommends.
WARMUP_RUNS = 2
# Staging rows: host token, in-flight state row (-1: the host's), position, slot, length,
# table update offset, table update value.
_HOST_TOKEN, _FLIGHT_ROW, _POSITION, _SLOT, _LENGTH, _UPDATE_AT, _UPDATE_VALUE = range(7)


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
    def __init__(self, model: Transformer, max_num_seqs: int, state: InputBatch | None = None, *,
                 use_graph: bool | None = None):
        if model.cache is None:
            raise ValueError("GraphRunner needs the model's KV cache allocated first (model.allocate_cache)")
        self.model = model
        self.device = model.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.max_num_seqs = max_num_seqs
        self.buckets = buckets_for(max_num_seqs)
        self.max_blocks = -(-model.max_seq_len // model.cache.block_size)
        M, dev = max_num_seqs, self.device

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=dev)

        # The static inputs: every replay reads exactly these tensors.
        self.token_ids = zeros(M)
        self.positions = zeros(M)
        self.slot_mapping = torch.full((M,), -1, dtype=torch.int64, device=dev)
        self.query_start = torch.arange(M + 1, dtype=torch.int32, device=dev)   # one query per row, always
        self.seq_lens = zeros(M, dtype=torch.int32)
        self.logits_rows = torch.arange(M, dtype=torch.int64, device=dev)
        # Block tables: the engine's persistent ones (row M: a spare that padding updates write), or its own.
        self.state = state
        self.tables = state.tables if state is not None else zeros(M + 1, self.max_blocks, dtype=torch.int32)
        self.sample = sampler_for(self.device)
        self.last_token = state.sampling.last_token if state is not None else zeros(M)
        self.staging = {b: zeros(7, b) for b in self.buckets}
        self.tokens = zeros(M)
        for b in self.buckets:
            self._pad_staging(self.staging[b], 0)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._eager_buckets: set[int] = set()      # capture failed: run the step eagerly
        self._pool = None

    def _pad_staging(self, staging: torch.Tensor, start: int) -> None:
        staging[:, start:] = 0
        staging[_FLIGHT_ROW, start:] = -1
        staging[_SLOT, start:] = -1
        staging[_UPDATE_AT, start:] = self.max_num_seqs * self.max_blocks     # the spare row

    # ------------------------------------------------------------------ the step
    def static_batch(self, bucket: int) -> Batch:
        """The Batch a bucket's graph runs: views of the first `bucket` rows of the buffers."""
        return Batch(token_ids=self.token_ids[:bucket], positions=self.positions[:bucket],
                     slot_mapping=self.slot_mapping[:bucket], query_start=self.query_start[:bucket + 1],
                     seq_lens=self.seq_lens[:bucket], block_tables=self.tables[:bucket],
                     max_query_len=1, logits_rows=self.logits_rows[:bucket])

    def _fill_inputs(self, bucket: int) -> None:
        """The staging into the static inputs and the block tables (the first part of a graph)."""
        st = self.staging[bucket]
        flight = st[_FLIGHT_ROW]
        self.token_ids[:bucket] = torch.where(flight >= 0, self.last_token[flight.clamp(min=0)], st[_HOST_TOKEN])
        self.positions[:bucket] = st[_POSITION]
        self.slot_mapping[:bucket] = st[_SLOT]
        self.seq_lens[:bucket] = st[_LENGTH]
        self.tables.view(-1)[st[_UPDATE_AT]] = st[_UPDATE_VALUE].to(torch.int32)

    def _step(self, bucket: int) -> torch.Tensor:
        """What a graph replays: the inputs filled, the forward, the draw into self.tokens."""
        self._fill_inputs(bucket)
        logits = self.model.forward(self.static_batch(bucket))
        if self.state is not None:
            rows = self.logits_rows[:bucket]
            self.sample(logits, rows, rows, self.state.sampling, self.tokens[:bucket])
        return logits

    def bucket_for(self, batch: Batch) -> int | None:
        """The bucket a batch replays in, or None when it must run eagerly."""
        B = batch.seq_lens.shape[0]
        if batch.max_query_len != 1 or batch.embeds is not None or not 1 <= B <= self.max_num_seqs \
                or batch.token_ids.shape[0] != B or batch.block_tables.shape[1] > self.max_blocks:
            return None
        return next(b for b in self.buckets if b >= B)

    def load(self, batch: Batch, bucket: int) -> None:
        """Stage a decode Batch, copy its block tables into the runner's, fill the static inputs."""
        B, width = batch.seq_lens.shape[0], batch.block_tables.shape[1]
        st = self.staging[bucket]
        self._pad_staging(st, 0)
        st[_HOST_TOKEN, :B] = batch.token_ids
        st[_POSITION, :B] = batch.positions
        st[_SLOT, :B] = batch.slot_mapping
        st[_LENGTH, :B] = batch.seq_lens
        self.tables[:B, :width] = batch.block_tables
        self.tables[:B, width:] = 0
        self.tables[B:bucket] = 0
        self._fill_inputs(bucket)

    def run(self, batch: Batch) -> torch.Tensor:
        """logits [len(batch.logits_rows), vocab] float32, as model.forward(batch) returns."""
        bucket = self.bucket_for(batch)
        if bucket is None:
            return self.model.forward(batch)
        self.load(batch, bucket)
        return self._replay(bucket)[batch.logits_rows]

    def fits(self, inputs: StepInputs) -> bool:
        """A step the engine may replay: a decode of state rows 0..B-1, each drawing a token."""
        B = len(inputs.rows)
        return (inputs.max_query_len == 1 and not inputs.embeds and not inputs.prompt_rows
                and 1 <= B <= self.max_num_seqs and inputs.rows[-1] == B - 1 and len(inputs.samples) == B
                and len(inputs.table_at) <= B)

    def replay(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's decode step: one staging copy, one replay -> (logits [B, vocab], tokens [B])."""
        B = len(inputs.rows)
        bucket = next(b for b in self.buckets if b >= B)
        spare = self.max_num_seqs * self.max_blocks
        pad = bucket - B
        flight = [-1] * B
        for at, row in zip(inputs.in_flight, inputs.flight_rows):
            flight[at] = row
        at, value = inputs.table_at, inputs.table_blocks
        staged = (inputs.tokens + [0] * pad + flight + [-1] * pad + inputs.positions + [0] * pad
                  + inputs.slots + [-1] * pad + inputs.lens + [0] * pad
                  + at + [spare] * (bucket - len(at)) + value + [0] * (bucket - len(at)))
        host = torch.tensor(staged, dtype=torch.int64, pin_memory=self.device.type == "cuda").view(7, bucket)
        self.staging[bucket].copy_(host, non_blocking=True)
        logits = self._replay(bucket)
        return logits[:B], self.tokens[:B]

    def _replay(self, bucket: int) -> torch.Tensor:
        if not self.use_graph or bucket in self._eager_buckets:
            return self._step(bucket)
        if bucket not in self._graphs:
            self.capture(bucket)
        if bucket not in self._graphs:
            return self._step(bucket)
        self._graphs[bucket].replay()
        return self._outputs[bucket]

    # ------------------------------------------------------------------ capture
    def capture(self, bucket: int) -> None:
        """Capture a bucket's step. Its staging holds padding while warm-up and capture run
        (no K/V written: slot -1; table updates into the spare row), then is restored."""
        saved = self.staging[bucket].clone()
        self._pad_staging(self.staging[bucket], 0)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    self._step(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._step(bucket)
        except RuntimeError as e:
            # A step that cannot be captured still runs, only slower: say so when it happens.
            warnings.warn(f"CUDA graph capture of the {bucket}-sequence decode step failed ({e}); "
                          f"running it eagerly", stacklevel=3)
            torch.cuda.synchronize(self.device)
            self._eager_buckets.add(bucket)
        else:
            self._graphs[bucket], self._outputs[bucket] = graph, out
        finally:
            self.staging[bucket].copy_(saved)

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
