"""The serving engine: many sequences decoded together on the paged KV cache.

    add_request -> Scheduler (waiting / running, token budget, chunked prefill, preemption)
                -> Batch (flat tokens, positions, slots, query starts, lengths, block tables)
                -> Transformer.forward (or the CUDA-graph runner) -> per-sequence sampling
                -> detokenize, stop strings -> RequestOutput

`Engine` is synchronous: `step()` runs one forward for everything scheduled and returns
what each request produced. `abort` may be called from any thread at any moment: the
sequence leaves the scheduler and its blocks are free at once (a forward already in
flight still writes into them, but nothing can be given those blocks before the step
that is running ends). `AsyncEngine` runs the step loop on a background thread and
hands each request's outputs to an async iterator.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass

import torch

from ..errors import ContextLengthError, RequestError
from ..model import Batch, PagedKVCache, Transformer
from ..sampling_params import SamplingParams, check_request
from ..tokenizer import Tokenizer
from .block_manager import BlockPool
from .detokenizer import TextStream
from .outputs import EngineStats, RequestOutput, TokenLogprob
from .sampler import SamplerState, logprobs, sample
from .scheduler import Scheduler
from .sequence import FINISHED, RUNNING, Sequence

DEFAULT_BLOCK_SIZE = 16


@dataclass(eq=False)
class _Request:
    seq: Sequence
    text: TextStream
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False


def _token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprob]:
    lp, ids, values = logprobs(logits, chosen, top)
    return [TokenLogprob(int(c), float(v), list(zip(i, t)))
            for c, v, i, t in zip(chosen.tolist(), lp.tolist(), ids.tolist(), values.tolist())]


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, eos_ids: set[int], *,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 cuda_graphs: bool = False):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
                or block_size & (block_size - 1) or block_size > 256:
            raise RequestError(f"block_size must be a power of two in [1, 256], got {block_size!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise RequestError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, set(eos_ids)
        self.block_size = block_size
        self.max_seq_len = model.max_seq_len
        n_blocks = self._pool_blocks(kv_cache_tokens, gpu_memory_utilization)
        model.allocate_cache(n_blocks, block_size)
        self.pool = BlockPool(n_blocks, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, block_size, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens)
        self.max_blocks_per_seq = -(-self.max_seq_len // block_size)
        if cuda_graphs:
            # Decode steps replayed from CUDA graphs, one per batch-size bucket; the rest eager.
            from .cuda_graph import GraphRunner
            self.runner = GraphRunner(model, max_num_seqs).run
        else:
            self.runner = model.forward
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestOutput] = []
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self.prompt_tokens = 0
        self.generated_tokens = 0

    # ------------------------------------------------------------------ sizing
    def _pool_blocks(self, kv_cache_tokens: int | None, utilization: float) -> int:
        """Blocks in the pool: from a token count when given; on CUDA from a fraction of the
        memory left after the weights (vLLM's gpu_memory_utilization); on the CPU two
        full-length sequences' worth."""
        model = self.model
        per_block = PagedKVCache.bytes_per_token(model.config, model.kv_dtype) * self.block_size
        device = model.device
        if kv_cache_tokens is not None:
            if isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 1:
                raise RequestError(f"kv_cache_tokens must be an integer >= 1, got {kv_cache_tokens!r}")
            n_blocks = -(-kv_cache_tokens // self.block_size)
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            spare = free - (1 - utilization) * total
            n_blocks = int(spare // per_block)
        else:
            n_blocks = 2 * -(-self.max_seq_len // self.block_size)
        from ..sampling_params import _device_memory
        memory = _device_memory(device)
        if n_blocks < 1 or n_blocks * per_block > memory:
            raise RequestError(f"a KV cache of {n_blocks} blocks of {self.block_size} tokens needs "
                               f"{max(n_blocks, 0) * per_block / 2**30:.2f} GiB; {device} has "
                               f"{memory / 2**30:.1f} GiB in all")
        return n_blocks

    @property
    def kv_cache_tokens(self) -> int:
        return self.pool.n_blocks * self.block_size

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    mm_embeds: list[tuple[int, torch.Tensor, bytes]] | None = None) -> str:
        """Queue a request; refused with RequestError if it could never fit."""
        prompt_ids = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        for i, t in enumerate(prompt_ids):
            if not 0 <= t < vocab:
                raise RequestError(f"prompt token {i} = {t} is outside the vocabulary 0..{vocab - 1}")
        self.check(len(prompt_ids), params)
        mm_embeds = list(mm_embeds or [])
        for off, e, _ in mm_embeds:
            if not (0 <= off and off + e.shape[0] <= len(prompt_ids)) or e.dim() != 2 \
                    or e.shape[1] != self.model.config.hidden_size:
                raise RequestError(f"embeddings of shape {tuple(e.shape)} at offset {off} do not fit a prompt "
                                   f"of {len(prompt_ids)} tokens with hidden size {self.model.config.hidden_size}")
        with self._lock:
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
            if request_id in self._requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            seq = Sequence(request_id, prompt_ids, params, SamplerState.start(params), mm_embeds=mm_embeds)
            self._requests[request_id] = _Request(seq, TextStream(self.tokenizer, params.stop))
            self.scheduler.add(seq)
        return request_id

    def check(self, n_prompt: int, params: SamplingParams) -> None:
        """Refuse a request that could never fit: over max_seq_len, or over the whole pool."""
        check_request(n_prompt, params, self.max_seq_len)
        total = n_prompt + params.max_new_tokens
        if -(-total // self.block_size) > self.pool.n_blocks:
            raise ContextLengthError(n_prompt, params.max_new_tokens, self.kv_cache_tokens, "whole KV cache")

    @contextlib.contextmanager
    def exclusive(self, n_blocks: int):
        """n_blocks taken from the pool for work outside the scheduler (Runtime.logits),
        with no step being scheduled meanwhile; given back afterwards."""
        with self._lock:
            if n_blocks > self.pool.num_free:
                raise RequestError(f"{n_blocks * self.block_size} tokens need more KV cache than the "
                                   f"{self.pool.num_free * self.block_size} tokens free now "
                                   f"(of {self.kv_cache_tokens}); load with a larger kv_cache_tokens")
            blocks = [self.pool.allocate() for _ in range(n_blocks)]
            try:
                yield blocks
            finally:
                for b in blocks:
                    self.pool.release(b)

    def abort(self, request_id: str) -> None:
        """Drop a request now, whatever it is doing; its blocks are free when this returns.
        Unknown or finished ids are ignored."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return
            self.scheduler.finish(req.seq, "abort")
            self._aborted.append(self._output(req, [], "", "abort"))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._requests) or bool(self._aborted)

    def stats(self) -> EngineStats:
        with self._lock:
            s = self.scheduler
            return EngineStats(running=len(s.running), waiting=len(s.waiting), num_blocks=self.pool.n_blocks,
                               free_blocks=self.pool.num_free, kv_usage=self.pool.usage,
                               prefix_queries=s.prefix_queries, prefix_hits=s.prefix_hits,
                               prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                               preemptions=s.preemptions)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        with self._lock:
            outputs, self._aborted = self._aborted, []
            step = self.scheduler.schedule()
            if not step.work:
                return outputs
            batch, samples, prompt_rows = self._batch(step.work)
        with torch.inference_mode():
            logits = self.runner(batch)
        with self._lock, torch.inference_mode():
            outputs += self._after(step.work, logits, samples, prompt_rows)
        return outputs

    def _batch(self, work: list[tuple[Sequence, int]]):
        """The flat Batch of a step; samples: (sequence, logits row) of the sequences that
        finish their tokens this step; prompt_rows: (sequence, first logits row, positions)
        of chunks whose prompt logprobs are wanted."""
        bs = self.block_size
        tokens, positions, slots, starts, lens, logit_rows = [], [], [], [0], [], []
        tables = torch.zeros((len(work), self.max_blocks_per_seq), dtype=torch.int32)
        samples, prompt_rows, embeds, embed_rows = [], [], [], []
        for b, (seq, n) in enumerate(work):
            lo, hi = seq.num_computed, seq.num_computed + n
            row0 = len(tokens)
            tokens += seq.tokens(lo, hi)
            positions += range(lo, hi)
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(lo, hi)]
            for off, e, _ in seq.mm_embeds:
                a, z = max(off, lo), min(off + e.shape[0], hi)
                if a < z:
                    embeds.append(e[a - off:z - off])
                    embed_rows += range(row0 + a - lo, row0 + z - lo)
            starts.append(len(tokens))
            lens.append(hi)
            tables[b, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
            want_prompt = seq.params.prompt_logprobs is not None and lo < len(seq.prompt_ids)
            if want_prompt:
                prompt_rows.append((seq, len(logit_rows), lo, hi))
                logit_rows += range(row0, row0 + n)
            if hi == seq.num_tokens:
                samples.append((seq, len(logit_rows) - 1 if want_prompt else len(logit_rows)))
                if not want_prompt:
                    logit_rows.append(row0 + n - 1)
        dev = self.model.device

        def t(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        batch = Batch(token_ids=t(tokens), positions=t(positions), slot_mapping=t(slots),
                      query_start=t(starts, torch.int32), seq_lens=t(lens, torch.int32),
                      block_tables=tables.to(dev, non_blocking=True),
                      max_query_len=max(n for _, n in work), logits_rows=t(logit_rows))
        if embeds:
            batch.embeds, batch.embed_rows = torch.cat(embeds).to(dev), t(embed_rows)
        return batch, samples, prompt_rows

    def _after(self, work, logits, samples, prompt_rows) -> list[RequestOutput]:
        for seq, n in work:
            if seq.status == FINISHED:        # aborted while the forward ran
                continue
            seq.num_computed += n
            self.scheduler.register_full_blocks(seq)
            self.prompt_tokens += max(0, min(seq.num_computed, len(seq.prompt_ids)) - (seq.num_computed - n))
        for seq, row, lo, hi in prompt_rows:
            req = self._requests.get(seq.request_id)
            if req is None or seq.status == FINISHED:
                continue
            self._collect_prompt_logprobs(req, logits[row:row + hi - lo], lo, hi)
        live = [(seq, row) for seq, row in samples if seq.status == RUNNING]
        outputs = []
        if not live:
            return outputs
        rows = torch.tensor([row for _, row in live], device=logits.device)
        picked = logits[rows]
        tokens = sample(picked, [s.sampler for s, _ in live], [(s.prompt_ids, s.output_ids) for s, _ in live])
        token_list = tokens.tolist()
        want = [i for i, (s, _) in enumerate(live) if s.params.logprobs is not None]
        token_lps = {}
        if want:
            top = max(live[i][0].params.logprobs for i in want)
            lps = _token_logprobs(picked[want], tokens[want], top)
            for i, lp in zip(want, lps):
                lp.top = lp.top[:live[i][0].params.logprobs]
                token_lps[i] = lp
        for i, ((seq, _), token) in enumerate(zip(live, token_list)):
            req = self._requests[seq.request_id]
            seq.output_ids.append(token)
            self.generated_tokens += 1
            p = seq.params
            ended = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
            text, stopped = ("", False) if ended else req.text.push(token)
            reason = None
            if ended or stopped:
                reason = "stop"
            elif len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_seq_len:
                reason = "length"
            if reason is not None:
                if not stopped:
                    text += req.text.flush()
                self.scheduler.finish(seq, reason)
                del self._requests[seq.request_id]
            outputs.append(self._output(req, [token], text, reason, token_lps.get(i)))
        return outputs

    def _collect_prompt_logprobs(self, req: _Request, logits: torch.Tensor, lo: int, hi: int) -> None:
        """Row p (position p's logits) scores prompt token p + 1."""
        prompt = req.seq.prompt_ids
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        # A preempted sequence recomputes its prompt: positions already scored are skipped.
        start = max(lo, len(req.prompt_logprobs) - 1)
        end = min(hi, len(prompt) - 1)
        if end > start:
            nxt = torch.tensor(prompt[start + 1:end + 1], device=logits.device)
            req.prompt_logprobs += _token_logprobs(logits[start - lo:end - lo], nxt, req.seq.params.prompt_logprobs)

    def _output(self, req: _Request, tokens: list[int], text: str, reason: str | None,
                token_lp: TokenLogprob | None = None) -> RequestOutput:
        seq = req.seq
        out = RequestOutput(request_id=seq.request_id, token_ids=tokens, text=text, finished=reason is not None,
                            finish_reason=reason, num_prompt_tokens=len(seq.prompt_ids),
                            num_cached_tokens=seq.num_cached_tokens,
                            logprobs=[token_lp] if token_lp is not None else
                            ([] if seq.params.logprobs is not None else None))
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent and seq.output_ids:
            out.prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
        return out

    # ------------------------------------------------------------------ synchronous use
    def run(self, requests: list[tuple]) -> list[list[RequestOutput]]:
        """Add every request, (prompt_ids, params) or (prompt_ids, params, mm_embeds), step
        until all finish; each request's outputs, in order."""
        ids = [self.add_request(p, params, None, *mm) for p, params, *mm in requests]
        outs: dict[str, list[RequestOutput]] = {i: [] for i in ids}
        while any(not o or not o[-1].finished for o in outs.values()):
            for out in self.step():
                if out.request_id in outs:
                    outs[out.request_id].append(out)
        return [outs[i] for i in ids]


