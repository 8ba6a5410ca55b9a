"""kernels/sampling.py: the one-launch Triton sampler (TRITON_INTERPRET=1 on the CPU)
against its torch reference sample_torch, whose filters tests/test_sampling.py checks
against transformers' warpers. The same tokens for every row kind (greedy, grammar
mask, penalties, temperature with top-k / top-p / min-p and their mixes, ties), the same
state afterwards (draw counters, last tokens, penalty history), through both of the
kernel's paths (candidates compacted, and bisection when they exceed the cap), and a
seeded row draws the same tokens alone or in a batch. Small vocabularies, and mostly a
cap of 256 candidates (the default 2048 costs ~5 s per row in the interpreter's sort): the
interpreter runs every tile in numpy. On a GPU (bench/run_gpu.sh) the same tests run the
compiled kernel against the reference on the device.
"""
import dataclasses

import pytest
import torch

from smollm3_triton.engine.sampler import SamplerState, load_rows
from smollm3_triton.errors import KernelInputError
from smollm3_triton.kernels.sampling import BLOCK_V, SamplingState, sample_torch, sample_triton
from smollm3_triton.sampling_params import SamplingParams

VOCAB = 2 * BLOCK_V + 77       # three tiles, the last one partial
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (temperature, top_k, top_p, min_p, penalties): one state row each
KINDS = [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=1),
    dict(temperature=0.7, top_k=40, seed=2),
    dict(temperature=1.0, top_p=0.9, seed=3),
    dict(temperature=1.3, min_p=0.05, seed=4),
    dict(temperature=0.8, top_k=20, top_p=0.8, seed=5),
    dict(temperature=1.0, top_k=5, min_p=0.1, seed=6),
    dict(temperature=0.9, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, seed=7),
    dict(temperature=0.0, repetition_penalty=1.2, seed=8),
    dict(temperature=2.0, top_k=3000, seed=9),      # top-k beyond the vocabulary: off
]


def _state(kinds, seed=0, masked_rows=()):
    gen = torch.Generator().manual_seed(seed)
    state = SamplingState.allocate(len(kinds) + 2, VOCAB, DEVICE)     # spare rows: rows need not be 0..S-1
    samplers = [SamplerState.start(SamplingParams(**k)) for k in kinds]
    histories = [(torch.randint(0, VOCAB, (30,), generator=gen).tolist(),
                  torch.randint(0, VOCAB, (s % 4,), generator=gen).tolist()) for s in range(len(kinds))]
    rows = [r + 1 for r in range(len(kinds))]
    load_rows(state, rows, samplers, histories)
    for r in masked_rows:                        # a grammar allowing about a third of the vocabulary
        state.masked[r] = 1
        state.bitmask[r] = (torch.randint(-2**31, 2**31, (state.bitmask.shape[1],), generator=gen,
                                          dtype=torch.int64).to(torch.int32) & 0x49249249).to(DEVICE)
    return state, torch.tensor(rows, device=DEVICE)


def _clone(state: SamplingState) -> SamplingState:
    return SamplingState(**{f.name: getattr(state, f.name).clone() for f in dataclasses.fields(state)})


def _logits(n_rows, seed, scale=3.0, ties=False):
    x = torch.randn(n_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    return ((x * 2).round() / 2 if ties else x).to(DEVICE)     # rounded: many equal values at every threshold


def _out(n):
    return torch.empty(n, dtype=torch.long, device=DEVICE)


def _both(logits, logits_rows, rows, state, steps, **kw):
    """Tokens of `steps` consecutive draws by the kernel and by the reference, each on its own
    copy of the state; the states after must be equal too."""
    ref_state, ker_state = _clone(state), _clone(state)
    logits_rows = logits_rows.to(DEVICE)
    ref, ker = [], []
    for _ in range(steps):
        ref.append(sample_torch(logits, logits_rows, rows, ref_state, _out(len(rows))).tolist())
        ker.append(sample_triton(logits, logits_rows, rows, ker_state, _out(len(rows)), **kw).tolist())
    for name in ("steps", "last_token", "history"):
        assert torch.equal(getattr(ref_state, name), getattr(ker_state, name)), name
    return ref, ker


@pytest.mark.parametrize("ties", [False, True])
def test_kernel_draws_the_references_tokens(ties):
    state, rows = _state(KINDS, masked_rows=(2, 8))
    logits = _logits(len(KINDS) + 3, seed=1, ties=ties)
    logits_rows = torch.randperm(len(KINDS) + 3, generator=torch.Generator().manual_seed(2))[:len(KINDS)]
    ref, ker = _both(logits, logits_rows, rows, state, steps=3, cap=256)
    assert ker == ref
    # the draws are draws: sampled rows move between steps, greedy rows do not
    assert len({step[1] for step in ref}) > 1 and len({step[0] for step in ref}) == 1


def test_default_cap_draws_the_references_tokens():
    """One draw with the cap a GPU runs (2048 candidates sorted in registers)."""
    kinds = [k for k in KINDS if "top_k" in k or "min_p" in k]
    state, rows = _state(kinds, seed=7)
    ref, ker = _both(_logits(len(kinds), seed=8), torch.arange(len(kinds)), rows, state, steps=1)
    assert ker == ref


def test_bisection_path_draws_the_references_tokens():
    """cap=16: every filtered row has more candidates than fit, so the thresholds come from
    bisection over z's bits."""
    kinds = [k for k in KINDS if k.get("temperature", 1.0) > 0]
    state, rows = _state(kinds, seed=3, masked_rows=(1,))
    logits = _logits(len(kinds), seed=4, scale=0.5)                  # flat: hundreds of candidates per row
    ref, ker = _both(logits, torch.arange(len(kinds)), rows, state, steps=2, cap=16)
    assert ker == ref


def test_a_seeded_row_draws_the_same_alone_and_batched():
    state, rows = _state(KINDS, seed=5)
    logits = _logits(len(KINDS), seed=6)
    batched = []
    together = _clone(state)
    for _ in range(2):
        batched.append(sample_triton(logits, torch.arange(len(KINDS), device=DEVICE), rows, together,
                                     _out(len(KINDS)), cap=256).tolist())
    for i in range(len(KINDS)):
        alone = _clone(state)
        one = torch.tensor([i], device=DEVICE)
        got = [int(sample_triton(logits, one, rows[one], alone, _out(1), cap=256)[0])
               for _ in range(2)]
        assert got == [step[i] for step in batched], KINDS[i]


def test_bad_inputs_are_named():
    state, rows = _state(KINDS[:2])
    out, two = _out(2), torch.arange(2, device=DEVICE)
    with pytest.raises(KernelInputError, match="logits of shape"):
        sample_triton(torch.zeros(2, VOCAB - 1, device=DEVICE), two, rows, state, out)
    with pytest.raises(KernelInputError, match="same 1-d shape"):
        sample_triton(torch.zeros(2, VOCAB, device=DEVICE), two[:1], rows, state, out)
    with pytest.raises(KernelInputError, match="cap must be a power of two"):
        sample_triton(torch.zeros(2, VOCAB, device=DEVICE), two, rows, state, out, cap=100)
