"""The serving engine: many sequences decoded together on the paged KV cache.

    add_request -> Scheduler (waiting / running, token budget, chunked prefill, preemption)
                -> ModelRunner.prepare: the persistent batch state (input_batch.py) -> Batch
                -> ModelRunner.launch: forward (or a CUDA graph), grammar bitmask rows
                   (structured_output.py), one sampling launch for the batch (kernels/sampling.py)
                -> the tokens read back -> detokenize, stop strings -> RequestOutput

`step()` returns what each request produced. On a GPU the loop overlaps: a step schedules
and launches the next forward before it reads the tokens of the one before, so the host's
work runs while the GPU computes. The tokens drawn by step N feed step N+1 on the device;
their ids reach the host once, one step later, for detokenizing and stop checks. A
sequence found finished then (an end token, a stop string, a grammar complete) was already
scheduled once more: that extra token is dropped, so the text is the synchronous loop's.
Requests ended by length are never scheduled past their last token. A step that holds a
constrained sequence is read before the next one is scheduled (its grammar must see the
token before the next bitmask). On the CPU the forward is the host's own work, nothing
can overlap, and each step is read at once (OVERLAP_DEVICES).

`abort` may be called from any thread at any moment: the sequence leaves the scheduler and
its blocks are free at once (a forward already in flight still writes into them, but
nothing can be given those blocks before a later step, queued behind it). `AsyncEngine`
runs the step loop on a background thread and hands each request's outputs to an async
iterator.
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
from .input_batch import StepInputs
from .model_runner import LaunchedStep, ModelRunner
from .outputs import EngineStats, RequestOutput, TokenLogprob
from .sampler import SamplerState
from .scheduler import Scheduler
from .sequence import FINISHED, RUNNING, Sequence, ThinkingBudget
from .structured_output import GrammarCompiler, fill_bitmasks

DEFAULT_BLOCK_SIZE = 16
# Devices whose steps run asynchronously to the host, where the loop overlaps.
OVERLAP_DEVICES = ("cuda",)


def _token_logprobs(chosen: list[int], lps: tuple) -> list[TokenLogprob]:
    lp, ids, values = lps
    return [TokenLogprob(c, float(v), list(zip(i, t)))
            for c, v, i, t in zip(chosen, lp.tolist(), ids.tolist(), values.tolist())]


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
                                   max_num_batched_tokens=max_num_batched_tokens, max_seq_len=self.max_seq_len)
        self.overlap = model.device.type in OVERLAP_DEVICES
        self._launched: LaunchedStep | None = None     # a step whose tokens are not read yet
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
            return bool(self._sequences) or bool(self._aborted) or self._launched is not None

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
        """Schedule and launch a step; return the outputs of the step read now (this one on
        the CPU, the one before it when the loop overlaps)."""
        with self._lock:
            outputs, self._aborted = self._aborted, []
            previous, self._launched = self._launched, None
            if previous is not None and previous.inputs.constrained:
                outputs += self._read(previous)       # its grammars must take the tokens first
                previous = None
            step = self.scheduler.schedule()
            inputs = self._prepare(step.work) if step.work else None
        launched = self.runner.launch(inputs) if inputs is not None else None
        with self._lock, torch.inference_mode():
            if previous is not None:
                outputs += self._read(previous)
            if launched is not None:
                if self.overlap:
                    self._launched = launched
                else:
                    outputs += self._read(launched)
        return outputs

    def _prepare(self, work: list[tuple[Sequence, int]]) -> StepInputs:
        inputs = self.runner.prepare(work)
        # One mask source per row: an active grammar, else the thinking budget (forcing its
        # closing tag when spent); a grammar gated on "</think>" is inactive until that tag is
        # written. A step with either is read before the next is scheduled: the next mask
        # depends on this step's token.
        constrained = []
        for s in inputs.samples:
            s.num_inflight += 1
            if s.constraint is not None and (s.constraint.active or s.thinking is None):
                constrained.append((s.row, s.constraint))
            elif s.thinking is not None:
                constrained.append((s.row, s.thinking))
        if constrained:
            fill_bitmasks(self.runner.batch.sampling, constrained)
            inputs.constrained = True
        for seq, hi in inputs.computed:
            n_prompt = len(seq.prompt_ids)
            if seq.num_computed < n_prompt:
                self.prompt_tokens += min(hi, n_prompt) - seq.num_computed
            seq.num_computed = hi
        return inputs

    def _read(self, launched: LaunchedStep) -> list[RequestOutput]:
        """A launched step's results: blocks registered, prompt logprobs, and each sampled
        token taken by its sequence (dropped if the sequence ended meanwhile)."""
        inputs = launched.inputs
        tokens = launched.read()
        bs = self.block_size
        for seq, hi in inputs.computed:
            if hi // bs > len(seq.keys) and seq.status == RUNNING:
                self.scheduler.register_full_blocks(seq, hi)
        for seq, lo, end, lps in launched.prompt_logprobs:
            if seq.status != FINISHED:
                self._collect_prompt_logprobs(seq, lps, lo, end)
        token_lps = {}
        if launched.token_logprobs is not None:
            rows = inputs.logprob_rows
            for i, lp in zip(rows, _token_logprobs([tokens[i] for i in rows], launched.token_logprobs)):
                lp.top = lp.top[:inputs.samples[i].params.logprobs]
                token_lps[i] = lp
        outputs = []
        eos_ids, max_seq_len, token_bytes = self.eos_ids, self.max_seq_len, self.tokenizer.token_bytes
        for i, (seq, token) in enumerate(zip(inputs.samples, tokens)):
            seq.num_inflight -= 1
            if seq.status == FINISHED:        # aborted, or ended by the token before this one
                continue
            output_ids = seq.output_ids
            output_ids.append(token)
            self.generated_tokens += 1
            p = seq.params
            if seq.thinking is not None:
                seq.thinking.advance(token, token_bytes)
            eos = token in eos_ids and not p.ignore_eos
            ended = eos or token in p.stop_token_ids
            text, stopped = ("", None) if ended else seq.text.push(token)
            # The grammar is complete (its stop token taken, or no stop token to wait for), or
            # refused the token (a masked row never samples one it refuses).
            complete = seq.constraint is not None and (
                not seq.constraint.advance(token, token_bytes) or seq.constraint.terminated)
            reason = None
            if ended or stopped or complete:
                reason = "stop"
            elif len(output_ids) >= p.max_new_tokens or len(seq.prompt_ids) + len(output_ids) >= max_seq_len:
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

    def _collect_prompt_logprobs(self, seq: Sequence, lps: tuple, lo: int, end: int) -> None:
        """Row p (position p's logits) scores prompt token p + 1."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        # A preempted sequence recomputes its prompt: positions already scored are skipped.
        start = max(lo, len(seq.prompt_logprobs) - 1)
        if end > start:
            k = start - lo
            seq.prompt_logprobs += _token_logprobs(seq.prompt_ids[start + 1:end + 1], tuple(t[k:] for t in lps))

    def _output(self, seq: Sequence, tokens: list[int], text: str, reason: str | None,
                token_lp: TokenLogprob | None = None) -> RequestOutput:
        # Positional: half the cost of keywords, once per sequence per step.
        out = RequestOutput(seq.request_id, tokens, text, reason is not None, reason, len(seq.prompt_ids),
                            seq.num_cached_tokens, [token_lp] if token_lp is not None else
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


