"""One request inside the engine: its tokens, sampling, blocks and progress."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams
from .detokenizer import TextStream
from .outputs import TokenLogprob
from .sampler import SamplerState
from .structured_output import Constraint

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class ThinkingBudget:
    """A cap on the tokens a sequence writes inside its think block. Once `budget` tokens have
    followed the opening tag (the model's, or the prompt's own), the closing tag's tokens are
    forced one per step, and the answer follows. A forced token is a one-token mask row, applied
    with the grammars' rows by fill_bitmasks: the structured-output mechanism, not a second one.
    """

    def __init__(self, budget: int, open_tag: bytes, close_tag: bytes, close_ids: list[int], opened: bool):
        self.budget, self.open_tag, self.close_tag, self.close_ids = budget, open_tag, close_tag, close_ids
        self.state = "inside" if opened else "before"     # before -> inside -> done
        self.used = 0                   # tokens written inside the block
        self.forced: list[int] = []     # closing-tag tokens still to write
        self._tail = b""
        self._check_budget()

    @property
    def active(self) -> bool:
        """The next token is forced."""
        return bool(self.forced)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """xgrammar's bitmask row (int32 words, bit set = allowed) allowing the forced token alone."""
        word, bit = divmod(self.forced[0], 32)
        bitmask[row] = 0
        bitmask[row, word] = (1 << bit) - (1 << 32 if bit == 31 else 0)   # bit 31 is int32's sign

    def advance(self, token: int, token_bytes) -> None:
        """Take the sampled token (the forced one, while forcing)."""
        if self.forced:
            self.forced.pop(0)
            if not self.forced:
                self.state = "done"
            return
        if self.state == "done":
            return
        tag = self.open_tag if self.state == "before" else self.close_tag
        seen = self._tail + token_bytes(token)
        if tag in seen:
            self.state, self._tail = ("inside", b"") if self.state == "before" else ("done", b"")
            self._check_budget()
            return
        self._tail = seen[-(len(tag) - 1):]
        if self.state == "inside":
            self.used += 1
            self._check_budget()

    def _check_budget(self) -> None:
        if self.state == "inside" and self.used >= self.budget:
            self.forced = list(self.close_ids)


@dataclass(eq=False)
class Sequence:
    """Everything the engine knows of one request: the one owner of its state."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SamplerState
    text: TextStream               # the output's text so far, cut at stop strings
    # (prompt offset, embeddings [n, hidden], content hash): rows that replace token embeddings
    mm_embeds: list[tuple[int, torch.Tensor, bytes]] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    status: str = WAITING
    num_computed: int = 0          # tokens whose K/V are in the cache
    num_cached_tokens: int = 0     # prompt tokens the prefix cache served at admission
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)   # prefix-cache keys of the full blocks so far
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    constraint: Constraint | None = None   # the grammar its output must match (structured output)
    thinking: ThinkingBudget | None = None  # the cap on its think block (params.thinking_budget)
    row: int | None = None         # its row in the persistent batch state while running (input_batch.py)
    num_inflight: int = 0          # tokens drawn on the device whose ids the host has not read yet

    @property
    def num_tokens(self) -> int:
        """Prompt and output, the tokens still in flight included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_inflight

    @property
    def num_known(self) -> int:
        """Prompt and output tokens whose ids the host holds."""
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Known token ids start..end-1, in O(end - start)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    def block_extra(self, j: int, block_size: int) -> bytes:
        """Content of block j beyond its token ids: the hashes of images it overlaps."""
        if not self.mm_embeds:           # text only: keyed at every block_size-th token
            return b""
        lo, hi = j * block_size, (j + 1) * block_size
        return b"".join(h + off.to_bytes(8, "little") for off, e, h in self.mm_embeds
                        if off < hi and off + e.shape[0] > lo)
