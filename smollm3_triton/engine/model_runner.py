"""The model side of a step: the KV pool sized and allocated, the persistent batch state,
and a step launched (forward, eager or replayed from a CUDA graph, then one sampling
launch) with its results on their way to the host.

`launch` returns at once on a GPU: the tokens (and any logprobs) are copied into pinned
host memory behind the step's kernels and an event marks them ready; `LaunchedStep.read`
waits for that event. Nothing in between reads the device, so the engine can schedule and
prepare the next step while this one runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RequestError
from ..kernels.sampling import allowed_tokens
from ..model import PagedKVCache, Transformer
from ..sampling_params import device_memory
from .input_batch import InputBatch, StepInputs
from .sampler import logprobs, sampler_for
from .sequence import Sequence


def pool_blocks(model: Transformer, block_size: int, kv_cache_tokens: int | None, utilization: float) -> int:
    """Blocks in the KV pool: from a token count when given; on CUDA from a fraction of the
    memory left after the weights (vLLM's gpu_memory_utilization); on the CPU two
    full-length sequences' worth."""
    per_block = PagedKVCache.bytes_per_token(model.config, model.kv_dtype) * block_size
    device = model.device
    if kv_cache_tokens is not None:
        if isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 1:
            raise RequestError(f"kv_cache_tokens must be an integer >= 1, got {kv_cache_tokens!r}",
                               param="kv_cache_tokens")
        n_blocks = -(-kv_cache_tokens // block_size)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        n_blocks = int((free - (1 - utilization) * total) // per_block)
    else:
        n_blocks = 2 * -(-model.max_seq_len // block_size)
    memory = device_memory(device)
    if n_blocks < 1 or n_blocks * per_block > memory:
        raise RequestError(f"a KV cache of {n_blocks} blocks of {block_size} tokens needs "
                           f"{max(n_blocks, 0) * per_block / 2**30:.2f} GiB; {device} has "
                           f"{memory / 2**30:.1f} GiB in all", param="kv_cache_tokens")
    return n_blocks


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy into pinned memory (on the CPU a copy: a graph's token buffer is
    overwritten by the next step before an overlapped loop reads this one)."""
    if t.device.type == "cpu":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@dataclass
class LaunchedStep:
    """A step whose kernels are queued: its inputs, and its results on their way to the host."""
    inputs: StepInputs
    tokens: torch.Tensor                                   # [S] int64, host
    token_logprobs: tuple | None                           # (chosen, top ids, top values) of inputs.logprob_rows
    prompt_logprobs: list[tuple[Sequence, int, int, tuple]]   # (sequence, lo, end, (chosen, ids, values))
    ready: torch.cuda.Event | None

    def read(self) -> list[int]:
        """The drawn tokens (waits for the step's kernels on a GPU)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class ModelRunner:
    def __init__(self, model: Transformer, *, block_size: int, max_num_seqs: int, kv_cache_tokens: int | None,
                 gpu_memory_utilization: float, cuda_graphs: bool):
        if not 0 < gpu_memory_utilization <= 1:
            raise RequestError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}",
                               param="gpu_memory_utilization")
        self.model, self.block_size = model, block_size
        self.n_blocks = pool_blocks(model, block_size, kv_cache_tokens, gpu_memory_utilization)
        model.allocate_cache(self.n_blocks, block_size)
        self.max_blocks_per_seq = -(-model.max_seq_len // block_size)
        self.batch = InputBatch(max_num_seqs, self.max_blocks_per_seq, block_size, model.config.vocab_size,
                                model.device)
        self.forward = model.forward                # a test may put a hook here
        self.sample = sampler_for(model.device)
        self.graphs = None
        if cuda_graphs:
            # Decode steps (forward and sampling) replayed from CUDA graphs, one per batch-size
            # bucket, captured now; prefill and mixed steps run eagerly.
            from .cuda_graph import GraphRunner
            self.graphs = GraphRunner(model, max_num_seqs, self.batch)
            self.graphs.capture_all()

    def prepare(self, work: list[tuple[Sequence, int]]) -> StepInputs:
        return self.batch.prepare(work)

    def launch(self, inputs: StepInputs) -> LaunchedStep:
        """Queue the step's forward and sampling; start its results' copies to the host."""
        state = self.batch.sampling
        with torch.inference_mode():
            if self.graphs is not None and self.forward == self.model.forward and self.graphs.fits(inputs):
                logits, tokens = self.graphs.replay(inputs)
                sample_rows = torch.arange(len(inputs.rows), device=logits.device)
                sample_logits = sample_rows
            else:
                batch, sample_rows, sample_logits = self.batch.batch(inputs)
                logits = self.forward(batch)
                tokens = torch.empty(len(inputs.samples), dtype=torch.int64, device=logits.device)
                if inputs.samples:
                    self.sample(logits, sample_logits, sample_rows, state, tokens)
            token_lps = None
            if inputs.logprob_rows:
                want = torch.tensor(inputs.logprob_rows, device=logits.device)
                top = max(inputs.samples[i].params.logprobs for i in inputs.logprob_rows)
                # a constrained row's logprobs are over what its grammar allows, as it samples
                x = logits[sample_logits[want]].masked_fill(~allowed_tokens(state, sample_rows[want]), float("-inf"))
                token_lps = tuple(_to_host(t) for t in logprobs(x, tokens[want], top))
            prompt = []
            for seq, row, lo, hi in inputs.prompt_rows:
                end = min(hi, len(seq.prompt_ids) - 1)
                if end > lo:
                    nxt = torch.tensor(seq.prompt_ids[lo + 1:end + 1], device=logits.device)
                    lps = logprobs(logits[row:row + end - lo], nxt, seq.params.prompt_logprobs)
                    prompt.append((seq, lo, end, tuple(_to_host(t) for t in lps)))
            host = _to_host(tokens)
            ready = None
            if logits.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
        return LaunchedStep(inputs, host, token_lps, prompt, ready)
