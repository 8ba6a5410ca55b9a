"""Which sequences run in the next step, and how many of their tokens.

First come, first served. Each step has a token budget (max_num_batched_tokens):
running sequences go first (a decode costs 1 token, an unfinished prefill takes the
next chunk that fits), then waiting ones are admitted while the budget, the running
limit (max_num_seqs) and the free blocks allow. A long prompt is thus cut into chunks
and mixed with the other sequences' decodes, never stalling them for its whole
prefill. When a running sequence needs a block and none is free, the newest running
sequence is preempted: its blocks are freed and it goes back to the head of the
waiting queue, to be recomputed (prompt and output so far) when there is room.

With the engine's overlapped loop a step is scheduled while the previous one runs: a
sequence's token still in flight counts in its length (Sequence.num_tokens), and one whose
token in flight is its last by length (max_new_tokens, max_seq_len) is not scheduled again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockPool, block_key
from .sequence import FINISHED, RUNNING, WAITING, Sequence


@dataclass
class ScheduledStep:
    work: list[tuple[Sequence, int]]      # (sequence, tokens computed this step), in batch order


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_seq_len: int):
        self.pool, self.block_size, self.max_seq_len = pool, block_size, max_seq_len
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Counters for stats: prompt tokens looked up in / served by the prefix cache.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # ------------------------------------------------------------------ blocks
    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return max(0, -(-(seq.num_computed + n) // self.block_size) - len(seq.blocks))

    def _grow(self, seq: Sequence, n: int) -> None:
        for _ in range(self._blocks_needed(seq, n)):
            seq.blocks.append(self.pool.allocate())

    def free(self, seq: Sequence) -> None:
        """Release every block (in reverse, so a sequence's tail is evicted before its head)."""
        for b in reversed(seq.blocks):
            self.pool.release(b)
        seq.blocks, seq.keys = [], []
        seq.num_computed = 0

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """(block, key) of the longest cached prefix. The last token is always computed
        (its logits are needed), so at most (num_tokens - 1) // block_size blocks."""
        if seq.params.prompt_logprobs is not None:      # every prompt token's logits are needed
            return []
        bs = self.block_size
        found, parent = [], None
        for j in range((seq.num_tokens - 1) // bs):
            key = block_key(parent, seq.tokens(j * bs, (j + 1) * bs), seq.block_extra(j, bs))
            block = self.pool.lookup(key)
            if block is None:
                break
            found.append((block, key))
            parent = key
        return found

    def _admit(self, seq: Sequence, prefix: list[tuple[int, bytes]]) -> None:
        for block, key in prefix:
            self.pool.share(block)
            seq.blocks.append(block)
            seq.keys.append(key)
        seq.num_computed = len(prefix) * self.block_size
        hit = min(seq.num_computed, len(seq.prompt_ids))
        seq.num_cached_tokens = max(seq.num_cached_tokens, hit)
        self.prefix_queries += len(seq.prompt_ids)
        self.prefix_hits += hit

    def register_full_blocks(self, seq: Sequence, upto: int) -> None:
        """After a step that computed the first `upto` tokens: key the blocks it filled, so
        later requests can share them."""
        bs = self.block_size
        while len(seq.keys) < upto // bs:
            j = len(seq.keys)
            key = block_key(seq.keys[-1] if seq.keys else None, seq.tokens(j * bs, (j + 1) * bs),
                            seq.block_extra(j, bs))
            self.pool.register(seq.blocks[j], key)
            seq.keys.append(key)

    # ------------------------------------------------------------------ the step
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq)
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> ScheduledStep:
        budget = self.max_num_batched_tokens
        work: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        i = 0
        bs, pool, running = self.block_size, self.pool, self.running
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.num_inflight and self._ends_in_flight(seq):
                i += 1
                continue
            lo = seq.num_computed
            n = min(seq.num_tokens - lo, budget)
            # A decode needs a new block once per block_size tokens: the test, inlined, is
            # most of this loop's work at batch 64. Preempting others leaves `need` as it is.
            need = (lo + n + bs - 1) // bs - len(seq.blocks)
            if need > 0:
                while pool.num_free < need:
                    victim = running[-1]
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status != RUNNING:
                    break
                blocks = seq.blocks
                for _ in range(need):
                    blocks.append(pool.allocate())
            work.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.num_inflight:
                break      # preempted with a token in flight: its ids must be known to recompute it
            prefix = self._cached_prefix(seq)
            cached = len(prefix) * self.block_size
            n = min(seq.num_tokens - cached, budget)
            # Blocks it would share that sit unreferenced in the cache are counted in
            # num_free too: taking them leaves that many fewer for fresh blocks.
            idle = sum(self.pool.ref[b] == 0 for b, _ in prefix)
            if self.pool.num_free - idle < -(-(cached + n) // self.block_size) - len(prefix):
                break      # waits at the head of the queue, holding nothing
            self.waiting.popleft()
            self._admit(seq, prefix)
            self._grow(seq, n)
            seq.status = RUNNING
            self.running.append(seq)
            work.append((seq, n))
            budget -= n
        return ScheduledStep(work)

    def _ends_in_flight(self, seq: Sequence) -> bool:
        """Its token in flight ends it by length: nothing more to compute."""
        return len(seq.output_ids) + seq.num_inflight >= seq.params.max_new_tokens or \
            seq.num_tokens >= self.max_seq_len

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self.free(seq)
        seq.status = FINISHED
        seq.finish_reason = reason
