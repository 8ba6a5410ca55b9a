"""The overlapped step loop (engine.py): step N+1 scheduled and launched before step N's
tokens are read, the in-flight token fed to step N+1 from the sampler's state on the
device. Its oracle is the synchronous loop on the same requests: the same tokens, text,
logprobs and finish reasons, with stop strings and stop tokens found one step late (the
extra token drawn meanwhile is discarded), length limits, penalties, seeds, prompt
logprobs, preemption under pressure and aborts.

The CPU has no asynchronous device, so the engine keeps the synchronous loop there
(OVERLAP_DEVICES); these tests set `engine.overlap` to run the overlapped schedule on it:
the bookkeeping is the same, only nothing runs concurrently.
"""
from __future__ import annotations

import pytest

from smollm3_triton import Runtime
from smollm3_triton.sampling_params import SamplingParams
from tests.helpers.engine_runs import TINY, fresh_engine, random_prompts, run_alone, run_staggered, summary
from tests.helpers.gguf_export import export_gguf, random_hf_model


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    hf = random_hf_model("smollm3", seed=11, **TINY)
    path = export_gguf(hf, tmp_path_factory.mktemp("overlap") / "smollm3.gguf", "f32")
    return Runtime.load(path, device="cpu", backend="torch", max_seq_len=512)


def engine_with(rt, overlap: bool, **options):
    engine = fresh_engine(rt, **options)
    engine.overlap = overlap
    drawn = []
    launch = engine.runner.launch

    def counting_launch(inputs):
        drawn.append(len(inputs.samples))
        return launch(inputs)
    engine.runner.launch = counting_launch
    return engine, drawn


def texts(engine, requests):
    outs = engine.run(requests)
    return [("".join(o.text for o in out), summary(out)) for out in outs]


def test_stop_found_one_step_late_gives_the_synchronous_text(rt):
    """Stop strings and stop tokens taken from each prompt's own free-running greedy text,
    so every request stops mid-way: the overlapped loop has drawn one token more by then
    (counted at launch), and discards it."""
    prompts = random_prompts(6, [5, 40, 17], seed=21)
    free = [run_alone(fresh_engine(rt), p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0]
            for p in prompts]
    requests = []
    for i, (p, ids) in enumerate(zip(prompts, free)):
        if i % 2:
            requests.append((p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True,
                                               stop_token_ids=[ids[5]])))
        else:
            text = rt.tokenizer.decode(ids)
            stop = text[len(text) // 2:len(text) // 2 + 3]
            requests.append((p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, stop=stop)))
    sync_engine, sync_drawn = engine_with(rt, overlap=False)
    over_engine, over_drawn = engine_with(rt, overlap=True)
    sync, over = texts(sync_engine, requests), texts(over_engine, requests)
    assert over == sync
    assert all(s[1][2] == "stop" for s in sync)
    delivered = sum(len(s[1][0]) for s in sync)
    assert sum(sync_drawn) == delivered and sum(over_drawn) > delivered, (sum(over_drawn), delivered)
    # the last launched step is read by the next step(): its tokens belong to finished requests
    assert over_engine.step() == [] and not over_engine.has_unfinished()
    assert over_engine.stats().free_blocks == over_engine.pool.n_blocks
    print(f"\noverlapped: {sum(over_drawn) - delivered} tokens drawn past a stop and discarded; text as synchronous")


@pytest.mark.parametrize("graph_step", [False, True])
def test_mixed_requests_staggered_equal_the_synchronous_loop(rt, graph_step):
    """Requests arriving while others decode, each with its own parameters (greedy,
    seeded with penalties and filters, logprobs, prompt logprobs, length limits).
    graph_step: decode steps through the CUDA-graph runner's static buffers (on the CPU
    run eagerly: staging, in-flight tokens read from the sampler's state, padding rows,
    the sampler inside the step), the path a GPU replays."""
    prompts = random_prompts(10, [3, 120, 17, 64, 33], seed=22)

    def params_of(i):
        return [SamplingParams(max_new_tokens=9, temperature=0, logprobs=2),
                SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=i,
                               repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2),
                SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=1),
                SamplingParams(max_new_tokens=7, temperature=1.1, min_p=0.05, seed=100 + i, logprobs=0)][i % 4]
    sync, _ = run_staggered(engine_with(rt, False, max_num_batched_tokens=48)[0], prompts, params_of)
    over_engine, _ = engine_with(rt, True, max_num_batched_tokens=48, max_num_seqs=5, cuda_graphs=graph_step)
    if graph_step:
        replayed = []
        replay = over_engine.runner.graphs.replay
        over_engine.runner.graphs.replay = lambda inputs: replayed.append(len(inputs.rows)) or replay(inputs)
    over, _ = run_staggered(over_engine, prompts, params_of)
    assert over == sync
    if graph_step:        # decode steps of 1..5 rows, in buckets 1, 2, 4 and 5: 3 rows pad to 4
        print(f"\nreplayed decode steps of {replayed} rows")
        assert len(replayed) >= 5 and 3 in replayed, replayed
    assert over_engine.stats().free_blocks == over_engine.pool.n_blocks


def test_pressure_and_aborts_under_the_overlapped_loop(rt):
    """A pool that holds 3 sequences: preemptions while tokens are in flight give the solo
    outputs; aborts mid-decode end each request exactly once and free the pool."""
    prompts = random_prompts(8, [40, 23, 47, 31], seed=23)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    solo = [run_alone(fresh_engine(rt, enable_prefix_caching=False), p, params) for p in prompts]
    engine, _ = engine_with(rt, True, kv_cache_tokens=3 * 72, max_num_seqs=8, max_num_batched_tokens=64)
    assert [summary(o) for o in engine.run([(p, params) for p in prompts])] == solo
    assert engine.stats().preemptions > 0

    ids = [engine.add_request(p, params) for p in prompts]
    outs: dict[str, list] = {i: [] for i in ids}
    for steps in range(5000):
        if steps == 8:
            for rid in ids[::2]:
                engine.abort(rid)
        for out in engine.step():
            assert not outs[out.request_id] or not outs[out.request_id][-1].finished, "output after the end"
            outs[out.request_id].append(out)
        if not engine.has_unfinished():
            break
    for i, rid in enumerate(ids):
        assert [o.finished for o in outs[rid]].count(True) == 1
        if outs[rid][-1].finish_reason != "abort":
            assert summary(outs[rid]) == solo[i]
    assert sum(outs[r][-1].finish_reason == "abort" for r in ids[::2]) >= 1
    stats = engine.stats()
    assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0


def test_thinking_budget_under_the_overlapped_loop(rt):
    """A spent thinking budget forces the closing tag through the sampler's mask rows: the
    overlapped loop reads such a step before scheduling the next, so the forced tokens land
    where the synchronous loop puts them."""
    prompt = rt.tokenizer.encode("Think first. <think>")
    requests = [(prompt, SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True, thinking_budget=b))
                for b in (2, 5)]
    requests.append((random_prompts(1, [20], seed=24)[0], SamplingParams(max_new_tokens=14, temperature=0,
                                                                        ignore_eos=True)))
    sync = texts(engine_with(rt, False)[0], requests)
    assert all("</think>" in text for text, _ in sync[:2]), sync
    assert texts(engine_with(rt, True)[0], requests) == sync
