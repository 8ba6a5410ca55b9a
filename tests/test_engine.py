"""The batching engine: batch invariance, the batched forward against one-sequence
forwards, the prefix cache, preemption under pressure, aborts from another thread.

The oracle of each test is the same request run alone (on a fresh engine with the
prefix cache off), or the one-sequence forward, or transformers. On the torch backend
in fp32 a row's arithmetic does not depend on the batch (kernels/attention_reference.py and
qmatmul_torch say why), so outputs are compared exactly, logprobs included.
"""
from __future__ import annotations

import threading

import pytest
import torch

from smollm3_triton import Runtime
from smollm3_triton.errors import RequestError
from smollm3_triton.sampling_params import SamplingParams
from tests.helpers.engine_runs import TINY, fresh_engine, random_prompts, run_alone, run_staggered, summary
from tests.helpers.gguf_export import export_gguf, random_hf_model, save_hf_folder


@pytest.fixture(scope="module")
def smollm3_gguf(tmp_path_factory):
    hf = random_hf_model("smollm3", seed=11, **TINY)     # NoPE on layer 4 (interval 4)
    return hf, export_gguf(hf, tmp_path_factory.mktemp("engine") / "smollm3.gguf", "f32")


@pytest.fixture(scope="module")
def rt(smollm3_gguf):
    return Runtime.load(smollm3_gguf[1], device="cpu", backend="torch", max_seq_len=2048)


# ---------------------------------------------------------------- batch invariance

LENGTHS = [3, 1500, 17, 250, 64, 700, 5, 33, 1024, 120, 9, 400, 16, 90, 1, 300]


def test_batch_invariance_greedy_and_seeded(rt):
    """32 prompts of 1 to 1,500 tokens, staggered, a 96-token budget (chunked prefill mixed
    with decodes): each request's tokens and logprobs equal the request run alone."""
    prompts = random_prompts(32, LENGTHS, seed=0)

    def params_of(i):
        if i % 2:
            return SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, top_k=40, seed=i, logprobs=0)
        return SamplingParams(max_new_tokens=6, temperature=0, logprobs=0)

    batched, steps = run_staggered(fresh_engine(rt, max_num_batched_tokens=96, max_num_seqs=16,
                                                kv_cache_tokens=8192), prompts, params_of)
    solo_engine = fresh_engine(rt, max_num_batched_tokens=96, enable_prefix_caching=False)
    solo = [run_alone(solo_engine, p, params_of(i)) for i, p in enumerate(prompts)]
    for i, (b, s) in enumerate(zip(batched, solo)):
        assert b == s, f"request {i} ({len(prompts[i])} prompt tokens) differs in a batch"
    print(f"\n32 requests over {steps} steps: tokens and logprobs bit-identical to each run alone")


def test_batch_invariance_triton_interpreter(smollm3_gguf):
    """The Triton kernels (interpreter): greedy tokens equal alone and batched. Their
    reductions differ with the batch shape (GEMV for <= 4 rows, tl.dot beyond), so
    logprobs are compared with a tolerance and the worst difference is printed."""
    rt = Runtime.load(smollm3_gguf[1], device="cpu", backend="triton", max_seq_len=64)
    prompts = random_prompts(3, [3, 20, 7], seed=1)
    params = SamplingParams(max_new_tokens=2, temperature=0, logprobs=0)
    batched, _ = run_staggered(fresh_engine(rt, max_num_batched_tokens=16), prompts, lambda i: params, 1)
    solo_engine = fresh_engine(rt, max_num_batched_tokens=16, enable_prefix_caching=False)
    worst = 0.0
    for p, b in zip(prompts, batched):
        s = run_alone(solo_engine, p, params)
        assert b[0] == s[0]
        worst = max(worst, max(abs(x - y) for x, y in zip(b[1], s[1])))
    assert worst < 1e-4
    print(f"\ntriton: greedy tokens equal; worst logprob difference batched vs alone {worst:.2e}")


# ---------------------------------------------------------------- batched forward vs one sequence

@pytest.mark.parametrize("kind,source", [("smollm3", "gguf"), ("smollm3", "safetensors"),
                                         ("llama", "gguf"), ("llama", "safetensors")])
def test_batched_logits_equal_one_sequence_forwards(kind, source, tmp_path):
    extra = dict(no_rope_layers=[1, 0, 1, 0]) if kind == "smollm3" and source == "safetensors" else {}
    hf = random_hf_model(kind, seed=3, **TINY, **extra)
    path = export_gguf(hf, tmp_path / "m.gguf", "f32") if source == "gguf" else save_hf_folder(hf, tmp_path)
    rt = Runtime.load(path, device="cpu", backend="torch", max_seq_len=512)
    seqs = random_prompts(5, [7, 300, 1, 64, 129], seed=4)
    together = rt.logits(seqs)
    worst = 0.0
    for ids, batched in zip(seqs, together):
        alone = rt.logits(ids)
        worst = max(worst, float((batched - alone).abs().max() / alone.abs().max()))
    with torch.no_grad():
        ref = hf(torch.tensor([seqs[1]])).logits[0]
    assert float((together[1] - ref).abs().max() / ref.abs().max()) < 1e-4
    assert worst <= 1e-5
    print(f"\n{kind} {source}: batched vs one-sequence logits, max rel {worst:.1e}")


# ---------------------------------------------------------------- prefix cache

def test_prefix_cache_prefills_only_new_tokens(rt):
    prefix = random_prompts(1, [1000], seed=5)[0]
    first, second = prefix + [500, 501, 502], prefix + [700, 701, 702, 703, 704]
    params = SamplingParams(max_new_tokens=5, temperature=0, logprobs=0)
    engine = fresh_engine(rt, max_num_batched_tokens=256)
    engine.run([(first, params)])
    before = engine.stats().prompt_tokens
    out = engine.run([(second, params)])[0]
    computed = engine.stats().prompt_tokens - before
    cached = 1000 // engine.block_size * engine.block_size      # full blocks of the shared prefix
    assert out[0].num_cached_tokens == cached
    assert computed == len(second) - cached
    uncached = run_alone(fresh_engine(rt, max_num_batched_tokens=256, enable_prefix_caching=False), second, params)
    assert summary(out) == uncached
    print(f"\nsecond request: {computed} of {len(second)} prompt tokens computed, {cached} from the cache; "
          f"output identical to the cache off")


def test_cached_blocks_are_evicted_lru_and_reused(rt):
    engine = fresh_engine(rt, kv_cache_tokens=64, block_size=16, max_num_batched_tokens=64)
    params = SamplingParams(max_new_tokens=2, temperature=0)
    a, b = random_prompts(2, [40], seed=6)
    engine.run([(a, params)])
    engine.run([(b, params)])      # needs blocks: a's cached ones are evicted, oldest first
    assert engine.stats().free_blocks == engine.pool.n_blocks
    again = engine.run([(b, params)])[0]
    assert again[0].num_cached_tokens == 32


# ---------------------------------------------------------------- pressure, preemption, abort

def test_pressure_preemption_and_abort(rt):
    """A pool that holds 3 sequences, 12 requests: all finish with their solo outputs;
    then 12 more with half aborted mid-decode from another thread: the pool is whole
    again, and every request ends exactly once."""
    prompts = random_prompts(12, [40, 23, 47, 31], seed=7)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    solo_engine = fresh_engine(rt, enable_prefix_caching=False)
    solo = [run_alone(solo_engine, p, params) for p in prompts]

    engine = fresh_engine(rt, kv_cache_tokens=3 * 72, max_num_seqs=12, max_num_batched_tokens=64)
    results = [summary(o) for o in engine.run([(p, params) for p in prompts])]
    assert results == solo
    assert engine.stats().preemptions > 0
    assert engine.stats().free_blocks == engine.pool.n_blocks
    print(f"\n12 requests in a 3-sequence pool: {engine.stats().preemptions} preemptions, outputs equal to solo")

    ids = [engine.add_request(p, params) for p in prompts]
    outs: dict[str, list] = {i: [] for i in ids}
    victims = set(ids[::2])
    stepped = threading.Event()

    def abort_mid_run():
        stepped.wait(10)
        for rid in victims:
            engine.abort(rid)
    aborter = threading.Thread(target=abort_mid_run)
    aborter.start()
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert not outs[out.request_id] or not outs[out.request_id][-1].finished, "output after the end"
            outs[out.request_id].append(out)
        steps += 1
        if steps == 6:
            stepped.set()
        assert steps < 5000
    aborter.join()
    for i, rid in enumerate(ids):
        assert [o.finished for o in outs[rid]].count(True) == 1
        if rid in victims and outs[rid][-1].finish_reason == "abort":
            continue
        assert summary(outs[rid]) == solo[i]
    assert sum(outs[r][-1].finish_reason == "abort" for r in victims) >= 1
    stats = engine.stats()
    assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0


def test_abort_frees_blocks_at_once(rt):
    engine = fresh_engine(rt, max_num_batched_tokens=32)
    rid = engine.add_request(random_prompts(1, [100], seed=8)[0], SamplingParams(max_new_tokens=50, temperature=0))
    for _ in range(5):
        engine.step()
    assert engine.stats().free_blocks < engine.pool.n_blocks
    engine.abort(rid)
    assert engine.stats().free_blocks == engine.pool.n_blocks
    assert [o.finish_reason for o in engine.step()] == ["abort"]
    assert not engine.has_unfinished()


def test_requests_that_can_never_fit_are_refused_at_add(rt):
    engine = fresh_engine(rt, kv_cache_tokens=256)
    with pytest.raises(RequestError, match=r"prompt \(300 tokens\) \+ max_new_tokens \(10\) = 310 tokens exceeds "
                                           r"the whole KV cache of 256 tokens"):
        engine.add_request([5] * 300, SamplingParams(max_new_tokens=10))
    with pytest.raises(RequestError, match="context of 2048 tokens"):
        engine.add_request([5] * 2000, SamplingParams(max_new_tokens=100))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([49152], SamplingParams())
    assert not engine.has_unfinished()


def test_stop_strings_and_stop_tokens_per_request(rt):
    """Each request its own stop: the text ends before the stop string, as the full
    greedy text cut there."""
    prompt = rt.tokenizer.encode("hello world, this is a test")
    free = rt.generate_ids(prompt, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    free = list(free)
    text = rt.tokenizer.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = rt.engine.run([(prompt, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=stop)),
                         (prompt, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[free[3]]))])
    assert "".join(o.text for o in cut[0]) == text[:text.find(stop)]
    assert cut[0][-1].finish_reason == "stop"
    assert [t for o in cut[1] for t in o.token_ids] == free[:free.index(free[3]) + 1]


def test_runtime_lists_run_together_in_order(rt):
    prompts = ["one two three", "alpha beta", "x"]
    together = rt.generate(prompts, max_new_tokens=5, temperature=0)
    assert together == [rt.generate(p, max_new_tokens=5, temperature=0) for p in prompts]


def test_prompt_logprobs_equal_the_full_forward(rt):
    ids = random_prompts(1, [70], seed=9)[0]
    engine = fresh_engine(rt, max_num_batched_tokens=32)      # the prompt is scored over three chunks
    out = engine.run([(ids, SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=2))])[0]
    lps = out[0].prompt_logprobs
    ref = torch.log_softmax(rt.logits(ids), -1)
    assert lps[0] is None and len(lps) == len(ids)
    for p in range(1, len(ids)):
        assert lps[p].token_id == ids[p]
        assert abs(lps[p].logprob - float(ref[p - 1, ids[p]])) < 1e-5
        assert [t for t, _ in lps[p].top] == ref[p - 1].topk(2).indices.tolist()


# ---------------------------------------------------------------- long context

def _peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_65536_token_prompt_on_the_cpu(tmp_path):
    """A 65,536-token prompt through a small random SmolLM3 (NoPE layer included), chunked
    prefill: the next token's top logprobs equal transformers' run over the same prompt in
    chunks on its own KV cache. No [heads, T, L] score matrix is ever built."""
    n = 65536
    hf = random_hf_model("smollm3", seed=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, no_rope_layers=[1, 0],
                         max_position_embeddings=n + 16)
    folder = save_hf_folder(hf, tmp_path)
    ids = random_prompts(1, [n], seed=13)[0]
    rss_before = _peak_rss_bytes()
    rt = Runtime.load(folder, device="cpu", backend="torch", max_seq_len=n + 8, max_num_batched_tokens=4096,
                      kv_cache_tokens=n + 16)
    kv_bytes = rt.model.cache.k.numel() * 8
    out = rt.engine.run([(ids, SamplingParams(max_new_tokens=1, temperature=0, logprobs=5))])[0]
    peak = _peak_rss_bytes() - rss_before
    ours = out[0].logprobs[0]

    from transformers import DynamicCache
    cache = DynamicCache()
    with torch.no_grad():
        for start in range(0, n, 4096):
            chunk = torch.tensor([ids[start:start + 4096]])
            logits = hf(chunk, past_key_values=cache, use_cache=True).logits[0, -1]
    ref = torch.log_softmax(logits.float(), -1)
    top = ref.topk(5)
    assert [t for t, _ in ours.top] == top.indices.tolist()
    worst = max(abs(v - float(r)) for (_, v), r in zip(ours.top, top.values))
    assert worst < 1e-4
    print(f"\n65,536-token prompt: top-5 next-token logprobs within {worst:.1e} of transformers; "
          f"KV cache {kv_bytes / 2**20:.0f} MiB, peak RSS growth {peak / 2**20:.0f} MiB "
          f"(goal: KV cache + < 1 GiB)")
    assert peak < kv_bytes + 2**30


def test_async_engine_streams_and_cancellation_aborts(rt):
    """AsyncEngine: concurrent async iterators get each request's own outputs (equal to the
    synchronous engine's); closing an iterator early aborts its request and frees its blocks."""
    import asyncio

    from smollm3_triton.engine import AsyncEngine
    prompts = random_prompts(4, [30, 5, 60, 12], seed=14)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    expected = [run_alone(fresh_engine(rt, enable_prefix_caching=False), p, params)[0] for p in prompts]
    engine = AsyncEngine(fresh_engine(rt, max_num_batched_tokens=32))

    async def collect(p):
        return [t async for out in engine.generate(p, params) for t in out.token_ids]

    async def cancelled(p):
        agen = engine.generate(p, SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts), cancelled(prompts[0]))

    try:
        got = asyncio.run(asyncio.wait_for(main(), timeout=120))[:4]
        assert got == expected
        stats = engine.stats()
        assert stats.running == stats.waiting == 0 and stats.free_blocks == stats.num_blocks
    finally:
        engine.shutdown()
