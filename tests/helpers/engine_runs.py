"""Running requests through an engine the ways the engine tests compare: alone on a
fresh engine, or staggered (arriving a few per step while others prefill and decode)."""
from __future__ import annotations

import random

from smollm3_triton import Runtime
from smollm3_triton.engine import Engine
from smollm3_triton.sampling_params import SamplingParams

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)


def fresh_engine(rt: Runtime, **options) -> Engine:
    """A new engine on rt's model (it reallocates the model's KV cache)."""
    return Engine(rt.model, rt.tokenizer, rt.eos_ids, **options)


def random_prompts(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def run_alone(engine: Engine, prompt: list[int], params: SamplingParams):
    outs = engine.run([(prompt, params)])[0]
    return summary(outs)


def summary(outs):
    tokens = [t for o in outs for t in o.token_ids]
    lps = [lp.logprob for o in outs for lp in (o.logprobs or [])]
    return tokens, lps, outs[-1].finish_reason


def run_staggered(engine: Engine, prompts, params_of, arrive_every: int = 2):
    """Requests arrive a few per step while earlier ones prefill and decode."""
    pending = list(enumerate(prompts))
    outs: dict[str, list] = {}
    order: list[str] = []
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % arrive_every == 0:
            for _ in range(2):
                if pending:
                    i, p = pending.pop(0)
                    rid = engine.add_request(p, params_of(i))
                    outs[rid] = []
                    order.append(rid)
        for out in engine.step():
            outs[out.request_id].append(out)
        steps += 1
        assert steps < 20_000
    return [summary(outs[r]) for r in order], steps
