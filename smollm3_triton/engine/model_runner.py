"""The model side of a step: the KV pool sized and allocated, a scheduled step turned into
the model's flat Batch, and the forward run (eagerly, or replayed from CUDA graphs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RequestError
from ..model import Batch, PagedKVCache, Transformer
from ..sampling_params import device_memory
from .sequence import Sequence


@dataclass
class StepInputs:
    """A step's batch, and where its logits rows go."""
    batch: Batch
    samples: list[tuple[Sequence, int]]                 # (sequence, logits row) of those that sample now
    prompt_rows: list[tuple[Sequence, int, int, int]]   # (sequence, first logits row, lo, hi) for prompt logprobs


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
        if cuda_graphs:
            # Decode steps replayed from CUDA graphs, one per batch-size bucket; the rest eager.
            from .cuda_graph import GraphRunner
            self.forward = GraphRunner(model, max_num_seqs).run
        else:
            self.forward = model.forward

    def prepare(self, work: list[tuple[Sequence, int]]) -> StepInputs:
        """The flat Batch of a step (sequence, tokens computed this step) in batch order."""
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
        return StepInputs(batch, samples, prompt_rows)

    def run(self, batch: Batch) -> torch.Tensor:
        """logits [len(batch.logits_rows), vocab] float32."""
        with torch.inference_mode():
            return self.forward(batch)
