"""Sampling against transformers' logits processors (the oracle for each filter) and
the draw against the distribution it should follow."""
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from smollm3_triton.engine.sampler import SamplerState, apply_repetition_penalty, load_rows, sampling_probs
from smollm3_triton.engine.sampler import sample as sample_batch
from smollm3_triton.kernels.sampling import (HISTORY_MAX_COUNT, SamplingState, filtered_probs, penalized_logits,
                                             sample_torch)
from smollm3_triton.sampling_params import SamplingParams


def sample(logits, params, step=0, history=()):
    """One draw of the engine's sampler for a single row at draw index `step`."""
    state = SamplerState.start(params)
    out = sample_batch(logits[None], [state], [(list(history), [0] * step)])
    return int(out[0])


def hf_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    for w in warpers:
        scores = w(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (0.8, 40, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (0.6, 0, 0.95, 0.0),
    (1.3, 0, 1.0, 0.05), (0.7, 20, 0.8, 0.0), (1.0, 5, 1.0, 0.1), (0.5, 0, 0.5, 0.0)])
def test_filtered_distribution_matches_transformers(temperature, top_k, top_p, min_p):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    ours = sampling_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    ref = hf_probs(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(ours > 0, ref > 0), "a different set of tokens survives the filters"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([3, 7, 7, 20, 49])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history[None], logits[None].clone())[0]
    assert torch.equal(apply_repetition_penalty(logits, history, 1.3), ref)


def test_draws_follow_the_distribution():
    # probabilities 0.5, 0.3, 0.15, 0.05; top_p 0.8 keeps the first two -> 0.625 / 0.375
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    draws = torch.tensor([sample(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=0), step)
                          for step in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.625) < 0.03      # ~4 standard deviations at n = 4000


def test_greedy_and_seed():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(2))
    assert sample(logits, SamplingParams(temperature=0)) == int(logits.argmax())
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1, seed=9)) == int(logits.argmax())
    runs = [[sample(logits, SamplingParams(temperature=2.0, seed=seed), step) for step in range(20)]
            for seed in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_each_row_of_a_batch_gets_its_own_filters():
    """filtered_probs with per-row parameters equals sampling_probs (the reference, itself
    checked against transformers above) row by row."""
    cases = [(1.0, 0, 1.0, 0.0), (0.7, 40, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.05), (0.7, 20, 0.8, 0.0)]
    logits = torch.randn(len(cases), 1000, generator=torch.Generator().manual_seed(3)) * 3

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype)[:, None]

    ours = filtered_probs(logits, col([c[0] for c in cases], torch.float64),
                          col([c[1] or 1000 for c in cases], torch.long), col([c[2] for c in cases], torch.float32),
                          col([c[3] for c in cases], torch.float32))
    for row, (t, k, p, m) in enumerate(cases):
        ref = sampling_probs(logits[row], SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m))
        assert torch.equal(ours[row] > 0, ref > 0)
        torch.testing.assert_close(ours[row] / ours[row].sum(), ref, rtol=1e-5, atol=1e-7)


def test_a_rows_draw_does_not_depend_on_the_batch():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0.9, top_k=50, seed=s) for s in range(5)] + [SamplingParams(temperature=0)]
    states = [SamplerState.start(p) for p in params]
    hist = [([1, 2], [3] * s) for s in range(6)]
    together = sample_batch(logits, states, hist).tolist()
    alone = [int(sample_batch(logits[b:b + 1], [states[b]], [hist[b]])[0]) for b in range(6)]
    assert together == alone


def test_penalties_match_their_definitions():
    """repetition: transformers' processor over prompt + output; presence / frequency:
    OpenAI's logit - presence * [count > 0] - frequency * count over the output."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    prompt, output = [3, 7, 7], [20, 7, 20, 20]
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    state = SamplingState.allocate(1, 50, "cpu")
    load_rows(state, [0], [SamplerState.start(p)], [(prompt, output)])
    rows = torch.zeros(1, dtype=torch.long)
    ours = penalized_logits(logits, rows, rows, state)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    counts = torch.bincount(torch.tensor(output), minlength=50).float()
    ref = ref - 0.5 * (counts > 0).float() - 0.25 * counts
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_cpu_rows_in_order_take_no_gather_and_leave_the_logits_alone():
    """sample_torch reads logits in place when they are the sampled rows in order (the CPU
    engine's case): penalties and masks still apply, to a copy, and the tokens are those of
    the gathered path (the same rows given out of order)."""
    vocab = 300
    before = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))

    def draw(logits, logits_rows):
        state = SamplingState.allocate(3, vocab, "cpu")
        state.penalized[1], state.penalties[1, 0] = 1, 5.0           # row 1: repetition penalty
        state.history[1, before[1].argmax()] = 1                     # on its best token (a prompt token)
        state.masked[2], state.bitmask[2, 0] = 1, 0b100              # row 2: only token 2 allowed
        return sample_torch(logits, logits_rows, torch.arange(3), state, torch.empty(3, dtype=torch.int64))

    logits = before.clone()
    in_order = draw(logits, torch.arange(3))
    assert torch.equal(logits, before)
    gathered = draw(before[[2, 0, 1]], torch.tensor([1, 2, 0]))     # rows 0, 1, 2 at 1, 2, 0
    assert torch.equal(in_order, gathered)
    assert int(in_order[0]) == int(before[0].argmax()) and int(in_order[2]) == 2
    assert int(in_order[1]) != int(before[1].argmax())


def test_output_counts_stop_at_the_history_limit():
    """A token repeated past HISTORY_MAX_COUNT (32,767) is penalised as if repeated that many
    times, and further draws of it neither wrap the count nor clear its mark."""
    vocab, limit = 16, HISTORY_MAX_COUNT
    p = SamplingParams(temperature=0, frequency_penalty=0.01)
    state = SamplingState.allocate(2, vocab, "cpu")
    load_rows(state, [0, 1], [SamplerState.start(p)] * 2, [([1], [5] * (limit + 10) + [7]), ([], [5] * (limit - 1))])
    rows = torch.arange(2)
    logits = torch.zeros(2, vocab)
    logits[:, 5] = 1000.0                               # drawn whatever its penalty
    expected = logits.clone()
    expected[:, 5] -= 0.01 * torch.tensor([limit, limit - 1]).float()
    expected[0, 7] -= 0.01
    torch.testing.assert_close(penalized_logits(logits, rows, rows, state), expected, rtol=0, atol=1e-4)
    out = torch.empty(2, dtype=torch.int64)
    for _ in range(2):                                  # row 1: limit - 1 -> limit -> limit
        assert sample_torch(logits, rows, rows, state, out).tolist() == [5, 5]
    expected[1, 5] = 1000.0 - 0.01 * limit
    torch.testing.assert_close(penalized_logits(logits, rows, rows, state), expected, rtol=0, atol=1e-4)
