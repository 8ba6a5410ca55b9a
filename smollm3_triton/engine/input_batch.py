"""The running sequences' state, kept on the device from step to step, and a step's Batch
built from it with constant host work per sequence.

Row r of the persistent state holds one running sequence: its block table (entries
written as blocks are appended, never rebuilt) and its sampling state
(kernels/sampling.SamplingState: parameters, seed keys, draw counter, penalty counts, the
last token drawn). Rows are dense, 0..n-1: a sequence that leaves (finished, aborted,
preempted) frees its row and the last rows move into the holes, with one copy per field
for all the moves of a step. A step's batch lists its sequences in row order, so a decode
of every running sequence reads the tables as they are (a view, no copy).

Per sequence and step the host computes a few integers (position, KV slot, length, the
table entries of a new block, where its logits row is) and the token id when it knows
it; a token drawn by the previous step and still in flight is read on the device from
the row's last token. The integers go to the device in one copy (pinned on CUDA).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from ..kernels.sampling import SamplingState
from ..model import Batch
from .sampler import load_rows
from .sequence import RUNNING, Sequence

# Per-row fields of SamplingState; history is moved only for penalised rows.
_ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "penalties", "penalized", "keys", "steps", "masked",
               "bitmask", "last_token", "scratch")


@dataclass
class StepInputs:
    """A step as the host computed it: its sequences in row order, and every integer of its
    batch as lists (InputBatch.batch makes the device tensors; a CUDA graph stages its own)."""
    rows: list[int]                         # state row of each batch entry (ascending)
    max_query_len: int
    tokens: list[int]                       # flat token ids (0 where the id is in flight)
    positions: list[int]
    slots: list[int]
    starts: list[int]                       # query starts, len(rows) + 1
    lens: list[int]                         # each sequence's length after the step
    logits_rows: list[int]                  # flat token rows whose logits the forward returns
    in_flight: list[int]                    # flat token rows whose id is the row's last drawn token
    flight_rows: list[int]                  # ... and that state row
    table_at: list[int]                     # new table entries: offsets in the flattened tables ...
    table_blocks: list[int]                 # ... and their block ids
    samples: list[Sequence]                 # the sequences that draw a token, in sample order
    sample_logits: list[int]                # each sample's logits row
    prompt_rows: list[tuple[Sequence, int, int, int]]   # (sequence, first logits row, lo, hi): prompt logprobs
    computed: list[tuple[Sequence, int]]    # (sequence, tokens computed once the step is done)
    embeds: list[torch.Tensor] = field(default_factory=list)
    embed_rows: list[int] = field(default_factory=list)
    logprob_rows: list[int] = field(default_factory=list)   # sample indices that want logprobs
    constrained: bool = False               # a sample's grammar must take its token before the next step


class InputBatch:
    def __init__(self, max_rows: int, max_blocks: int, block_size: int, vocab: int, device: torch.device):
        self.block_size, self.max_blocks, self.device = block_size, max_blocks, device
        self.seqs: list[Sequence] = []            # row -> sequence
        self.table_len = [0] * max_rows           # table entries written per row
        # row max_rows: a spare that a CUDA graph's padding table updates write
        self.tables = torch.zeros((max_rows + 1, max_blocks), dtype=torch.int32, device=device)
        self._tables_flat = self.tables.view(-1)
        self.sampling = SamplingState.allocate(max_rows, vocab, device)
        self.pinned = device.type == "cuda"

    # ------------------------------------------------------------------ rows
    def sync(self, work: list[tuple[Sequence, int]]) -> None:
        """Rows for a step: those of sequences no longer running freed, newcomers added."""
        gone = [r for r, s in enumerate(self.seqs) if s.status != RUNNING]
        if gone:
            self._remove(gone)
        new = [seq for seq, _ in work if seq.row is None]
        if new:
            rows = list(range(len(self.seqs), len(self.seqs) + len(new)))
            for seq, r in zip(new, rows):
                seq.row = r
                self.seqs.append(seq)
                self.table_len[r] = 0
            load_rows(self.sampling, rows, [s.sampler for s in new], [(s.prompt_ids, s.output_ids) for s in new])

    def _remove(self, gone: list[int]) -> None:
        n, kept = len(self.seqs), len(self.seqs) - len(gone)
        gone_set = set(gone)
        for r in gone:
            self.seqs[r].row = None
        holes = [r for r in gone if r < kept]
        movers = [r for r in range(kept, n) if r not in gone_set]
        for h, m in zip(holes, movers):
            seq = self.seqs[m]
            self.seqs[h], seq.row, self.table_len[h] = seq, h, self.table_len[m]
        del self.seqs[kept:]
        st = self.sampling
        if holes:
            dst, src = (torch.tensor(v, device=self.device) for v in (holes, movers))
            self.tables[dst] = self.tables[src]
            for name in _ROW_FIELDS:
                t = getattr(st, name)
                t[dst] = t[src]
            pen = [(h, m) for h, m in zip(holes, movers) if self.seqs[h].sampler.penalized]
            if pen:
                pdst, psrc = (torch.tensor(v, device=self.device) for v in zip(*pen))
                st.history[pdst] = st.history[psrc]
        # Free rows draw greedily, unpenalised and unmasked: a CUDA graph's padding rows sample them.
        free = slice(kept, n)
        st.temperature[free] = 0
        st.penalized[free] = 0
        st.masked[free] = 0

    # ------------------------------------------------------------------ a step
    def prepare(self, work: list[tuple[Sequence, int]]) -> StepInputs:
        """A step (sequence, tokens computed this step) as lists, in row order: O(1) per
        decoding sequence, O(n) for a chunk of n prompt tokens, whatever the context."""
        self.sync(work)
        work = sorted(work, key=lambda w: w[0].row)
        bs, width = self.block_size, self.max_blocks
        x = StepInputs(rows=[], max_query_len=max(n for _, n in work), tokens=[], positions=[], slots=[],
                       starts=[0], lens=[], logits_rows=[], in_flight=[], flight_rows=[], table_at=[],
                       table_blocks=[], samples=[], sample_logits=[], prompt_rows=[], computed=[])
        tokens, logits_rows, samples, positions, slots = x.tokens, x.logits_rows, x.samples, x.positions, x.slots
        rows, starts, lens, computed, table_len = x.rows, x.starts, x.lens, x.computed, self.table_len
        for seq, n in work:
            r, blocks = seq.row, seq.blocks
            rows.append(r)
            lo = seq.num_computed
            hi = lo + n
            if table_len[r] < len(blocks):
                x.table_at += range(r * width + table_len[r], r * width + len(blocks))
                x.table_blocks += blocks[table_len[r]:]
                table_len[r] = len(blocks)
            n_prompt = len(seq.prompt_ids)
            if n == 1 and lo >= n_prompt and hi == seq.num_tokens:
                # A decode (most of a step's sequences): one token after the prompt, drawing the next.
                known = n_prompt + len(seq.output_ids)
                if lo < known:
                    tokens.append(seq.output_ids[lo - n_prompt])
                else:                              # the token in flight
                    x.in_flight.append(len(tokens))
                    x.flight_rows.append(r)
                    tokens.append(0)
                positions.append(lo)
                slots.append(blocks[lo // bs] * bs + lo % bs)
                starts.append(len(tokens))
                lens.append(hi)
                computed.append((seq, hi))
                if seq.params.logprobs is not None:
                    x.logprob_rows.append(len(samples))
                samples.append(seq)
                x.sample_logits.append(len(logits_rows))
                logits_rows.append(len(tokens) - 1)
                continue
            row0 = len(tokens)
            known = seq.num_known
            if hi <= known:
                tokens += seq.tokens(lo, hi)
            else:                                  # the last input is the token in flight
                tokens += seq.tokens(lo, known)
                tokens.append(0)
                x.in_flight.append(len(tokens) - 1)
                x.flight_rows.append(r)
            positions += range(lo, hi)
            slots += [blocks[p // bs] * bs + p % bs for p in range(lo, hi)]
            for off, e, _ in seq.mm_embeds:
                a, z = max(off, lo), min(off + e.shape[0], hi)
                if a < z:
                    x.embeds.append(e[a - off:z - off])
                    x.embed_rows += range(row0 + a - lo, row0 + z - lo)
            starts.append(len(tokens))
            lens.append(hi)
            computed.append((seq, hi))
            want_prompt = seq.params.prompt_logprobs is not None and lo < n_prompt
            if want_prompt:
                x.prompt_rows.append((seq, len(logits_rows), lo, hi))
                logits_rows += range(row0, row0 + n)
            if hi == seq.num_tokens:
                if seq.params.logprobs is not None:
                    x.logprob_rows.append(len(samples))
                samples.append(seq)
                x.sample_logits.append(len(logits_rows) - 1 if want_prompt else len(logits_rows))
                if not want_prompt:
                    logits_rows.append(row0 + n - 1)
        return x

    def batch(self, x: StepInputs) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """The step's Batch, its samples' state rows and logits rows, on the device: every
        integer in one host tensor and one copy, the batch's tensors views of it; the new
        table entries written; the tables a view when the rows are 0..B-1."""
        N, B, R, S, F, U = (len(v) for v in (x.tokens, x.lens, x.logits_rows, x.samples, x.in_flight, x.table_at))
        flat = array("q", x.tokens)          # array.array: a third of torch.tensor(list)'s time
        for part in (x.positions, x.slots, x.starts, x.lens, x.logits_rows, [s.row for s in x.samples],
                     x.sample_logits, x.in_flight, x.flight_rows, x.table_at, x.table_blocks):
            flat.extend(part)
        host = torch.frombuffer(flat, dtype=torch.int64)
        dev = host.pin_memory().to(self.device, non_blocking=True) if self.pinned else host
        token_ids, pos, slot, qs, sl, lr, srows, slog, fl_at, fl_rows, u_at, u_val = \
            dev.split([N, N, N, B + 1, B, R, S, S, F, F, U, U])
        if F:
            token_ids[fl_at] = self.sampling.last_token[fl_rows]
        if U:
            self._tables_flat.index_put_((u_at,), u_val.to(torch.int32))
        if x.rows[-1] == B - 1:
            tables = self.tables[:B]
        else:
            tables = self.tables[torch.tensor(x.rows, device=self.device)]
        batch = Batch(token_ids=token_ids, positions=pos, slot_mapping=slot, query_start=qs.to(torch.int32),
                      seq_lens=sl.to(torch.int32), block_tables=tables, max_query_len=x.max_query_len,
                      logits_rows=lr)
        if x.embeds:
            batch.embeds = torch.cat(x.embeds).to(self.device)
            batch.embed_rows = torch.tensor(x.embed_rows, device=self.device)
        return batch, srows, slog
