"""The serving engine: many sequences decoded together on the paged KV cache.

    add_request -> Scheduler (waiting / running, token budget, chunked prefill, preemption)
                -> Batch (flat tokens, positions, slots, query starts, lengths, block tables)
                -> Transformer.forward (or the CUDA-graph runner)
                -> grammar masks on the constrained rows (structured_output.py) -> per-sequence sampling
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

import torch

from ..chat import THINK_CLOSE, THINK_OPEN
from ..errors import ContextLengthError, RequestError
from ..model import Transformer
from ..sampling_params import SamplingParams, check_request
from ..tokenizer import Tokenizer
from .block_manager import BlockPool
from .detokenizer import TextStream
from .model_runner import ModelRunner
from .outputs import EngineStats, RequestOutput, TokenLogprob
from .sampler import SamplerState, logprobs, sample
from .scheduler import Scheduler
from .sequence import FINISHED, RUNNING, Sequence, ThinkingBudget
from .structured_output import GrammarCompiler, apply_constraints

DEFAULT_BLOCK_SIZE = 16


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
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, set(eos_ids)
        self.block_size = block_size
        self.max_seq_len = model.max_seq_len
        self.runner = ModelRunner(model, block_size=block_size, max_num_seqs=max_num_seqs,
                                  kv_cache_tokens=kv_cache_tokens, gpu_memory_utilization=gpu_memory_utilization,
                                  cuda_graphs=cuda_graphs)
        self.pool = BlockPool(self.runner.n_blocks, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, block_size, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)
        # A spent thinking budget writes the closing tag as the model writes it after its
        # thoughts (SmolLM3's template closes an empty block with "\n</think>\n").
        self._think_close_ids = tokenizer.encode(f"\n{THINK_CLOSE}\n")
        self._sequences: dict[str, Sequence] = {}
        self._aborted: list[RequestOutput] = []
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self.prompt_tokens = 0
        self.generated_tokens = 0

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    @property
    def num_blocks(self) -> int:
        return self.pool.n_blocks

    @property
    def kv_cache_tokens(self) -> int:
        return self.pool.n_blocks * self.block_size

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    mm_embeds: list[tuple[int, torch.Tensor, bytes]] | None = None) -> str:
        """Queue a request; refused with RequestError if it could never fit, or if its
        structured output's grammar is invalid or does not compile in time (compiled here,
        on the caller's thread, unless already cached)."""
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
        constraint = None
        if params.structured_outputs is not None:
            stop_ids = (set() if params.ignore_eos else self.eos_ids) | set(params.stop_token_ids)
            constraint = self.grammars.constraint(params.structured_outputs, stop_ids)
        thinking = None
        if params.thinking_budget is not None:
            # The prompt itself may have opened the block (a template ending with <think>).
            opened = self.tokenizer.decode(prompt_ids[-8:]).rstrip().endswith(THINK_OPEN)
            thinking = ThinkingBudget(params.thinking_budget, THINK_OPEN.encode(), THINK_CLOSE.encode(),
                                      self._think_close_ids, opened)
        with self._lock:
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
            if request_id in self._sequences:
                raise RequestError(f"request id {request_id!r} is already in use")
            seq = Sequence(request_id, prompt_ids, params, SamplerState.start(params),
                           TextStream(self.tokenizer, params.stop), mm_embeds=mm_embeds, constraint=constraint,
                           thinking=thinking)
            self._sequences[request_id] = seq
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
            seq = self._sequences.pop(request_id, None)
            if seq is None:
                return
            self.scheduler.finish(seq, "abort")
            self._aborted.append(self._output(seq, [], "", "abort"))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._sequences) or bool(self._aborted)

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
            inputs = self.runner.prepare(step.work)
        logits = self.runner.run(inputs.batch)
        with self._lock, torch.inference_mode():
            outputs += self._after(step.work, logits, inputs.samples, inputs.prompt_rows)
        return outputs

    def _after(self, work, logits, samples, prompt_rows) -> list[RequestOutput]:
        for seq, n in work:
            if seq.status == FINISHED:        # aborted while the forward ran
                continue
            seq.num_computed += n
            self.scheduler.register_full_blocks(seq)
            self.prompt_tokens += max(0, min(seq.num_computed, len(seq.prompt_ids)) - (seq.num_computed - n))
        for seq, row, lo, hi in prompt_rows:
            if seq.status != FINISHED:
                self._collect_prompt_logprobs(seq, logits[row:row + hi - lo], lo, hi)
        live = [(seq, row) for seq, row in samples if seq.status == RUNNING]
        outputs = []
        if not live:
            return outputs
        rows = torch.tensor([row for _, row in live], device=logits.device)
        picked = logits[rows]           # a copy: masking it leaves `logits` as the model gave it
        # One mask source per row: an active grammar, else a spent thinking budget's closing tag
        # (a grammar gated on "</think>" is inactive until that tag is written).
        constrained = []
        for i, (s, _) in enumerate(live):
            if s.constraint is not None and s.constraint.active:
                constrained.append((i, s.constraint))
            elif s.thinking is not None and s.thinking.active:
                constrained.append((i, s.thinking))
        if constrained:
            apply_constraints(picked, constrained)
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
            seq.output_ids.append(token)
            self.generated_tokens += 1
            p = seq.params
            if seq.thinking is not None:
                seq.thinking.advance(token, self.tokenizer.token_bytes)
            eos = token in self.eos_ids and not p.ignore_eos
            ended = eos or token in p.stop_token_ids
            text, stopped = ("", None) if ended else seq.text.push(token)
            # The grammar is complete (its stop token taken, or no stop token to wait for), or
            # refused the token (a masked row never samples one it refuses).
            complete = seq.constraint is not None and (
                not seq.constraint.advance(token, self.tokenizer.token_bytes) or seq.constraint.terminated)
            reason = None
            if ended or stopped or complete:
                reason = "stop"
            elif len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_seq_len:
                reason = "length"
            if reason is not None:
                if not stopped:
                    text += seq.text.flush()
                self.scheduler.finish(seq, reason)
                del self._sequences[seq.request_id]
            out = self._output(seq, [token], text, reason, token_lps.get(i))
            out.stop_reason = stopped if stopped is not None else (token if ended and not eos else None)
            outputs.append(out)
        return outputs

    def _collect_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, lo: int, hi: int) -> None:
        """Row p (position p's logits) scores prompt token p + 1."""
        prompt = seq.prompt_ids
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        # A preempted sequence recomputes its prompt: positions already scored are skipped.
        start = max(lo, len(seq.prompt_logprobs) - 1)
        end = min(hi, len(prompt) - 1)
        if end > start:
            nxt = torch.tensor(prompt[start + 1:end + 1], device=logits.device)
            seq.prompt_logprobs += _token_logprobs(logits[start - lo:end - lo], nxt, seq.params.prompt_logprobs)

    def _output(self, seq: Sequence, tokens: list[int], text: str, reason: str | None,
                token_lp: TokenLogprob | None = None) -> RequestOutput:
        out = RequestOutput(request_id=seq.request_id, token_ids=tokens, text=text, finished=reason is not None,
                            finish_reason=reason, num_prompt_tokens=len(seq.prompt_ids),
                            num_cached_tokens=seq.num_cached_tokens,
                            logprobs=[token_lp] if token_lp is not None else
                            ([] if seq.params.logprobs is not None else None))
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and seq.output_ids:
            out.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
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


