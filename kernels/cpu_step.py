"""The cpu backend's decode step as one call into the compiled kernels (csrc/cpu/step.c).

A decode step of SmolLM2-135M is ~210 ops; called one by one from Python each costs a few
microseconds of interpreter and tensor bookkeeping, ~1 ms a token beside ~10 ms of work.
`DecodeStepRunner` stands in for `Transformer.forward` as the engine's runner: a step where
every sequence brings one token (and no image rows) runs in C, layer after layer, on the
same kernels the ops use (so its logits equal the op-by-op forward's); any other step goes
to the forward it wraps. It reads the model's weights and KV cache in place and re-reads
the cache's address when the engine allocates a new one.
"""
from __future__ import annotations

import torch

from .cpu_native import _cpu, KV_DTYPES, NativeWeight


def supported(model) -> bool:
    """Whether the model's steps can run in C: every matrix packed for the kernels, fp32
    activations, float norms, a head size and group the attention kernel takes."""
    c, w = model.config, model.weights
    mats = [w.lm_head] + [m for l in w.layers for m in (l.qkv, l.o, l.gate_up, l.down)]
    return (_cpu is not None and model.dtype == torch.float32 and all(isinstance(m, NativeWeight) for m in mats)
            and c.head_dim % 8 == 0 and c.head_dim <= 256 and c.n_heads % c.n_kv_heads == 0
            and c.n_heads // c.n_kv_heads <= 16)


# Steps of up to this many rows run in C, prompt rows too (each a sequence of its own: K/V of
# the whole step are written before attention reads them). Measured on a 19-token prompt of
# SmolLM2-135M, 2 threads, load 3.4: 35.1 ms op by op, 32.2 ms here. Longer prompts keep the
# prompt attention, which reads a key once for all rows.
PROMPT_ROWS = 64


class DecodeStepRunner:
    def __init__(self, model, fallback):
        self.model, self.fallback = model, fallback
        self.cache = self.handle = None
        self.keep: list[torch.Tensor] = []

    def _build(self) -> None:
        m, c, w, cache = self.model, self.model.config, self.model.weights, self.model.cache
        norm = lambda v: v.float().contiguous()        # noqa: E731  (kept alive in self.keep)
        layers, keep = [], [m.cos, m.sin]
        for i, l in enumerate(w.layers):
            a, f = norm(l.attn_norm), norm(l.ffn_norm)
            keep += [a, f]
            layers.append((a.data_ptr(), f.data_ptr(), l.qkv.handle, l.o.handle, l.gate_up.handle, l.down.handle,
                           cache.k[i].data_ptr(), cache.v[i].data_ptr(), int(c.use_rope[i])))
        final = norm(w.norm)
        keep.append(final)
        k = cache.k
        config = (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, w.layers[0].gate_up.shape[0] // 2,
                  w.lm_head.shape[0], m.cos.shape[0],
                  k.shape[1] * k.shape[3], KV_DTYPES[k.dtype], k.shape[3], m.cos.data_ptr(), m.sin.data_ptr(),
                  final.data_ptr())
        self.handle = _cpu.step_model(config, c.rms_norm_eps, m.scale, w.lm_head.handle, layers)
        self.keep, self.cache = keep, cache

    def __call__(self, batch) -> torch.Tensor:
        n = batch.token_ids.shape[0]
        cache = self.model.cache
        if batch.embeds is not None or n > PROMPT_ROWS or cache.k.dtype not in KV_DTYPES \
                or not cache.k.is_contiguous():
            return self.fallback(batch)
        if cache is not self.cache:
            self._build()
        x = self.model.weights.embed.dequantize_rows(batch.token_ids, torch.float32).contiguous()
        rows = batch.logits_rows.to(torch.int64).contiguous()
        if any(not 0 <= r < n for r in rows.tolist()):
            raise IndexError(f"logits rows {rows.tolist()} outside the step's {n} tokens")
        logits = torch.empty((rows.shape[0], self.model.weights.lm_head.shape[0]), dtype=torch.float32)
        positions, slots = batch.positions.to(torch.int64).contiguous(), batch.slot_mapping.to(torch.int64).contiguous()
        if batch.seq_lens.shape[0] == n:        # one token a sequence
            tables, lens = batch.block_tables, batch.seq_lens
        else:       # prompt rows: each one a sequence of its own, up to its position, on its blocks
            starts = batch.query_start.to(torch.int64)
            tables = batch.block_tables[torch.repeat_interleave(torch.arange(starts.shape[0] - 1),
                                                                starts[1:] - starts[:-1])]
            lens = positions + 1
        tables, lens = tables.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous()
        _cpu.decode_step(self.handle, x.data_ptr(), n, positions.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                         tables.shape[1], lens.data_ptr(), rows.data_ptr(), rows.shape[0], logits.data_ptr(),
                         torch.get_num_threads())
        return logits
