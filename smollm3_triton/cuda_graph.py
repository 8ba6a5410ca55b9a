"""The decode loop on static buffers: each token is one replay of a CUDA graph of the
model step, then one replay of a graph of the device sampler.

- Static buffers: the input token (the sampler's output tensor, so a drawn token
  feeds the next step without leaving the device), its position, the logits; the
  KV cache is the model's own static cache.
- `GraphDecoder.step` is the decode step. The graph captures exactly that function;
  without a graph (CPU, or use_graph=False) the same function runs eagerly.
- Prefill runs eagerly (outside any graph): its length varies per request.
- The host never waits for the device before queueing more work: up to `lookahead`
  steps are queued ahead of the token being read, and each token reaches the host
  by an asynchronous copy into pinned memory, read after its event completes. When
  an end token shows up, the steps already queued beyond it are simply dropped
  (their KV rows lie past the end and are never read by the next request).

A graph needs every op of the step to be capturable: no host reads and no
data-dependent shapes. The Triton ops are; the torch reference's attention reads
the context length on the host, so the graph path is for backend "triton".
"""
from __future__ import annotations

import warnings
from collections import OrderedDict, deque
from typing import Callable, Iterator

import torch

from .device_sampling import DeviceSampler, SamplerSpec
from .generation import SamplingParams, check_request, generate_tokens
from .model import Transformer

# Distinct sampler specs kept captured at once (each holds a small memory pool).
MAX_SAMPLER_GRAPHS = 8
# Warm-up runs on a side stream before capture: compiles / autotunes the Triton
# kernels and lets the caching allocator settle, as torch.cuda.graphs recommends.
WARMUP_RUNS = 2


class GraphDecoder:
    """Token generation for one Transformer: eager prefill, graph-replayed decode."""

    def __init__(self, model: Transformer, *, use_graph: bool | None = None, lookahead: int = 2):
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.model = model
        self.device = model.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.lookahead = lookahead
        self.sampler = DeviceSampler(model.config.vocab_size, self.device)
        self.token = self.sampler.token           # the step's input is the sampler's output
        self.position = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.logits = torch.zeros((1, model.config.vocab_size), dtype=torch.float32, device=self.device)
        self._step_runner: Callable[[], None] | None = None
        self._sampler_runners: OrderedDict[SamplerSpec, Callable[[], None]] = OrderedDict()
        self._graphs: list = []                  # keeps captured graphs (and their pools) alive
        # A ring of host slots (pinned, so the copies are asynchronous) and their events:
        # at most lookahead + 1 tokens are in flight, so a slot is read before its reuse.
        cuda = self.device.type == "cuda"
        self._host = torch.zeros((lookahead + 2, 1), dtype=torch.int64, pin_memory=cuda)
        self._events = [torch.cuda.Event() for _ in range(lookahead + 2)] if cuda else None

    # ------------------------------------------------------------------ the captured functions
    def step(self) -> None:
        """One decode step on the static buffers: the token at `position` in, its K/V
        into the cache, next-token logits out, position advanced. This is the function
        the CUDA graph captures."""
        self.logits.copy_(self.model.forward(self.token, self.position))
        self.position.add_(1)

    def sample(self) -> None:
        """Draw the next token from `logits` into `token` (DeviceSampler.sample_)."""
        self.sampler.sample_(self.logits)

    # ------------------------------------------------------------------ runners
    def step_runner(self) -> Callable[[], None]:
        """`step` itself, or the replay of its graph (captured on first use)."""
        if self._step_runner is None:
            self._step_runner = self._runner(self.step)
        return self._step_runner

    def sampler_runner(self, spec: SamplerSpec) -> Callable[[], None]:
        """`sample` with the sampler set to `spec`, or the replay of that spec's graph."""
        self.sampler.spec = spec
        if spec in self._sampler_runners:
            self._sampler_runners.move_to_end(spec)
            return self._sampler_runners[spec]
        runner = self._runner(self.sample)
        self._sampler_runners[spec] = runner
        if len(self._sampler_runners) > MAX_SAMPLER_GRAPHS:
            self._sampler_runners.popitem(last=False)
        return runner

    def _runner(self, fn: Callable[[], None]) -> Callable[[], None]:
        if not self.use_graph:
            return fn
        try:
            graph = capture(fn)
        except RuntimeError as e:
            # A function that cannot be captured still runs, only slower: say so when it happens.
            warnings.warn(f"CUDA graph capture of {fn.__name__} failed ({e}); running it eagerly", stacklevel=3)
            torch.cuda.synchronize(self.device)
            return fn
        self._graphs.append(graph)
        return graph.replay

    # ------------------------------------------------------------------ the token loop
    def generate_tokens(self, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> Iterator[int]:
        """generation.generate_tokens on this decoder: yields new token ids until an end
        token (yielded) or max_new_tokens. The request is checked when this is called."""
        check_request(len(prompt_ids), params, self.model.max_seq_len)
        return self._token_loop(list(prompt_ids), params, eos_ids)

    def _token_loop(self, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> Iterator[int]:
        # inference_mode is entered per chunk of work, never held across a yield, so the
        # caller's code between tokens runs in its own grad mode.
        with torch.inference_mode():
            step, sample = self._prepare(prompt_ids, params)
            sample()
            pending = deque([self._to_host(0)])
        issued = 1
        for i in range(params.max_new_tokens):
            with torch.inference_mode():
                while issued < params.max_new_tokens and issued - i <= self.lookahead:
                    step()
                    sample()
                    pending.append(self._to_host(issued))
                    issued += 1
            token = self._read(pending.popleft())
            yield token
            if token in eos_ids:
                return

    def _prepare(self, prompt_ids: list[int], params: SamplingParams):
        """Runners for the request's spec (captured first: warm-up runs write the buffers),
        then the request's sampler state and the prompt's prefill into `logits`."""
        step = self.step_runner()
        sample = self.sampler_runner(SamplerSpec.of(params, self.model.config.vocab_size))
        self.sampler.reset(params, prompt_ids)
        n = len(prompt_ids)
        ids = torch.tensor(prompt_ids, dtype=torch.int64).to(self.device)
        self.logits.copy_(self.model.forward(ids, torch.arange(n, device=self.device), last_only=True))
        self.position.fill_(n)
        return step, sample

    def _to_host(self, index: int):
        """Queue the copy of the token just drawn into host slot `index` (of the ring)."""
        i = index % self._host.shape[0]
        slot = self._host[i]
        if self._events is None:
            slot.copy_(self.token)
            return slot, None
        slot.copy_(self.token, non_blocking=True)
        self._events[i].record()
        return slot, self._events[i]

    @staticmethod
    def _read(entry) -> int:
        slot, event = entry
        if event is not None:
            event.synchronize()
        return int(slot[0])


def capture(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph after WARMUP_RUNS eager runs on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def token_loop_for(model: Transformer, backend: str):
    """The token loop Runtime should use: (prompt_ids, params, eos_ids) -> Iterator[int].

    CUDA with the Triton kernels: a GraphDecoder (graph decode, device sampling).
    Anything else: generation.generate_tokens, the eager reference."""
    if model.device.type == "cuda" and backend == "triton":
        return GraphDecoder(model).generate_tokens
    return lambda prompt_ids, params, eos_ids: generate_tokens(model, prompt_ids, params, eos_ids)
