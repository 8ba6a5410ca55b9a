"""The CUDA-graph decode runner (smollm3_triton.cuda_graph.GraphRunner) on small random models.

On CPU no graph can be captured, so these run GraphRunner with use_graph=False: the
same static buffers, padding to the bucket and copy-in as the graph path, with the
step called eagerly. Its logits must equal model.forward on the unpadded batch (the
torch ops: bit-identical, since qmatmul pads to 16 rows and attention handles each
sequence alone), and padding rows must write nothing into the pool. A dispatch-mode
probe checks that the Triton step does nothing that would make the host wait for a
GPU (.item(), nonzero, ...). The CUDA cases (replay against the eager step, no sync
per step) are marked gpu.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smollm3_triton.backends import get_backend
from smollm3_triton.config import ModelConfig
from smollm3_triton.engine.cuda_graph import GraphRunner, buckets_for
from smollm3_triton.gguf.constants import GGMLType
from smollm3_triton.gguf.tensors import QuantTensor, concat_rows
from smollm3_triton.model import Batch, Transformer
from smollm3_triton.weights import LayerWeights, ModelWeights, to_device

VOCAB = 512
MAX_SEQ = 64
BLOCK = 8


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def tiny_model(backend="torch", device="cpu", dtype=torch.float32, *, hidden=128, intermediate=256,
               n_heads=4, n_kv_heads=2, n_layers=4, seed=3) -> Transformer:
    """A random SmolLM3-style model (layer 3 NoPE, GQA), built in memory: the decode loop
    does not care where weights come from, and this keeps transformers out of the way.
    Weights N(0, 0.08), norms 1 + N(0, 0.1), as tests/gguf_export.random_hf_model makes them."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // n_heads

    def matrix(rows, cols):
        return QuantTensor(0.08 * torch.randn(rows, cols, generator=gen), GGMLType.F32, (rows, cols))

    def norm():
        return 1 + 0.1 * torch.randn(hidden, generator=gen)

    config = ModelConfig(arch="smollm3", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                         rms_norm_eps=1e-6, rope_theta=5e6, max_position_embeddings=MAX_SEQ,
                         use_rope=tuple((i + 1) % 4 != 0 for i in range(n_layers)), tie_word_embeddings=True)
    layers = [LayerWeights(norm(), concat_rows([matrix(n_heads * head_dim, hidden),
                                                matrix(n_kv_heads * head_dim, hidden),
                                                matrix(n_kv_heads * head_dim, hidden)]),
                           matrix(hidden, n_heads * head_dim), norm(),
                           concat_rows([matrix(intermediate, hidden), matrix(intermediate, hidden)]),
                           matrix(hidden, intermediate))
              for _ in range(n_layers)]
    embed = matrix(VOCAB, hidden)
    device = torch.device(device)
    chosen = get_backend(backend, device, dtype)
    weights = chosen.prepare_weights(to_device(ModelWeights(embed=embed, layers=layers, norm=norm(), lm_head=embed),
                                               device))
    return Transformer(config, weights, chosen.ops, max_seq_len=MAX_SEQ, dtype=dtype, device=device)


class Sequences:
    """Sequences in a model's pool, each with its own shuffled blocks; builds the Batch
    of a step as the engine does (its table as wide as max_seq_len needs)."""

    def __init__(self, model: Transformer, n_blocks: int = 48, seed: int = 0):
        self.model = model
        model.allocate_cache(n_blocks, BLOCK)
        self.width = -(-model.max_seq_len // BLOCK)
        self.free = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: list[list[int]] = []
        self.tokens: list[list[int]] = []

    def add(self, n_tokens: int, seed: int) -> int:
        self.blocks.append([self.free.pop() for _ in range(self.width)])
        self.tokens.append(torch.randint(0, VOCAB, (n_tokens,), generator=torch.Generator().manual_seed(seed)).tolist())
        return len(self.tokens) - 1

    def batch(self, work: list[tuple[int, int, int]]) -> Batch:
        """work: (sequence, first position, count) per sequence of the step."""
        dev = self.model.device
        ids, pos, slots, starts, lens = [], [], [], [0], []
        tables = torch.zeros(len(work), self.width, dtype=torch.int32)
        for b, (s, lo, n) in enumerate(work):
            ids += self.tokens[s][lo:lo + n]
            pos += range(lo, lo + n)
            slots += [self.blocks[s][p // BLOCK] * BLOCK + p % BLOCK for p in range(lo, lo + n)]
            starts.append(len(ids))
            lens.append(lo + n)
            tables[b] = torch.tensor(self.blocks[s], dtype=torch.int32)
        t = lambda v, dt=torch.int64: torch.tensor(v, dtype=dt, device=dev)
        return Batch(token_ids=t(ids), positions=t(pos), slot_mapping=t(slots), query_start=t(starts, torch.int32),
                     seq_lens=t(lens, torch.int32), block_tables=tables.to(dev),
                     max_query_len=max(n for _, _, n in work), logits_rows=t([e - 1 for e in starts[1:]]))


def prefilled(model, prompt_lens, seed=0):
    """Sequences with their prompts (all but the last token) already in the cache."""
    seqs = Sequences(model, seed=seed)
    for i, n in enumerate(prompt_lens):
        seqs.add(n + 8, seed=seed * 100 + i)
    with torch.inference_mode():
        model.forward(seqs.batch([(i, 0, n) for i, n in enumerate(prompt_lens)]))
    return seqs


def decode_step(seqs, prompt_lens, step, rows=None):
    rows = range(len(prompt_lens)) if rows is None else rows
    return seqs.batch([(i, prompt_lens[i] + step, 1) for i in rows])


def test_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(8) == [1, 2, 4, 8]
    assert buckets_for(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        buckets_for(0)


def test_needs_an_allocated_cache():
    with pytest.raises(ValueError, match="allocate_cache"):
        GraphRunner(tiny_model(), 4)


def test_cpu_runner_has_no_graph():
    model = tiny_model()
    model.allocate_cache(8, BLOCK)
    assert not GraphRunner(model, 4).use_graph
    with pytest.raises(ValueError, match="CUDA"):
        GraphRunner(model, 4, use_graph=True)


def test_padded_decode_equals_forward_and_writes_nothing_extra():
    """Decode steps of 3 sequences (bucket 4), then 4, then 2 (rows of the last step's
    bucket beyond its batch must be reset to padding): the runner's logits equal the
    forward of the unpadded batch bit for bit, and the pools after each step are equal."""
    lens = [5, 11, 3, 7]
    a, b = tiny_model(), tiny_model()
    seqs_a, seqs_b = prefilled(a, lens), prefilled(b, lens)
    runner = GraphRunner(a, max_num_seqs=8)
    with torch.inference_mode():
        for step, rows in enumerate([(0, 1, 2), (0, 1, 2, 3), (1, 3), (2,)]):
            batch_a, batch_b = decode_step(seqs_a, lens, step, rows), decode_step(seqs_b, lens, step, rows)
            assert runner.bucket_for(batch_a) == {3: 4, 4: 4, 2: 2, 1: 1}[len(rows)]
            got, want = runner.run(batch_a), b.forward(batch_b)
            assert got.shape == want.shape == (len(rows), VOCAB)
            assert torch.equal(got, want), rel_err(got, want)
            assert torch.equal(a.cache.k, b.cache.k) and torch.equal(a.cache.v, b.cache.v)


def test_prefill_and_mixed_steps_run_eagerly():
    lens = [6, 4]
    a, b = tiny_model(), tiny_model()
    seqs_a, seqs_b = prefilled(a, lens), prefilled(b, lens)
    runner = GraphRunner(a, max_num_seqs=4)
    with torch.inference_mode():
        mixed_a, mixed_b = seqs_a.batch([(0, 6, 1), (1, 4, 3)]), seqs_b.batch([(0, 6, 1), (1, 4, 3)])
        assert runner.bucket_for(mixed_a) is None
        assert torch.equal(runner.run(mixed_a), b.forward(mixed_b))
        # More sequences than max_num_seqs: eager as well.
        big = Sequences(tiny_model(), seed=1)
        for i in range(5):
            big.add(3, seed=i)
        assert GraphRunner(big.model, max_num_seqs=4).bucket_for(big.batch([(i, 0, 1) for i in range(5)])) is None


# Ops whose result the host must read (a CUDA sync) or whose output shape depends on data.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2",
            "unique_consecutive", "equal", "is_nonzero", "repeat_interleave", "masked_scatter", "item"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # indexing with a bool mask runs nonzero inside the op
        masked = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in SYNC_OPS or name.startswith("_unique") or masked:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_probe_catches_a_host_read():
    with HostReads() as probe:
        x = torch.arange(4)
        int(x.max())
        x[x > 1]
    assert probe.seen == ["_local_scalar_dense", "index"]


def test_triton_decode_step_makes_no_host_read():
    """The runner's step on the Triton ops (under the interpreter without a GPU, compiled
    with one) reads nothing back on the host: what a CUDA graph needs. (The torch
    reference's attention does read the lengths, which is why graphs are for backend
    'triton'.)"""
    pytest.importorskip("smollm3_triton.kernels.repack")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # small enough for the interpreter: 2 layers, head_dim 16
    shape = dict(hidden=64, intermediate=128, n_heads=4, n_kv_heads=2, n_layers=2)
    model = tiny_model("triton", device=device, **shape)
    seqs = Sequences(model)
    for i in range(3):
        seqs.add(6, seed=i)
    runner = GraphRunner(model, max_num_seqs=4, use_graph=False)
    with torch.inference_mode():
        batch = seqs.batch([(i, 2 + i, 1) for i in range(3)])   # earlier rows hold zeros: values do not matter
        runner.run(batch)                                         # compiles (on a GPU) outside the probe
        runner.load(batch, 4)
        with HostReads() as probe:
            model.forward(runner.static_batch(4))
        assert probe.seen == []
        ref = tiny_model(**shape)
        ref_seqs = Sequences(ref)
        for i in range(3):
            ref_seqs.add(6, seed=i)
        with HostReads() as probe:
            ref.forward(ref_seqs.batch([(i, 2 + i, 1) for i in range(3)]))
    assert "item" in probe.seen or "_local_scalar_dense" in probe.seen   # attention_torch reads lengths


# ---------------------------------------------------------------- CUDA

def cuda_pair(lens):
    """Two identical Triton bf16 models on the GPU with the same prompts prefilled."""
    pytest.importorskip("smollm3_triton.kernels.repack")
    out = []
    for _ in range(2):
        m = tiny_model("triton", device="cuda", dtype=torch.bfloat16)
        out.append((m, prefilled(m, lens)))
    return out


@pytest.mark.gpu
def test_graph_replay_equals_eager_forward():
    """Decode steps of 1, 3, 8 and 5 sequences replayed from graphs (buckets 1, 4, 8, 8):
    logits and pools bit-identical to the eager forward of the same padded batch."""
    lens = [5, 11, 3, 7, 9, 2, 13, 4]
    (a, seqs_a), (b, seqs_b) = cuda_pair(lens)
    graph = GraphRunner(a, max_num_seqs=8)
    eager = GraphRunner(b, max_num_seqs=8, use_graph=False)
    with torch.inference_mode():
        for step, rows in enumerate([(0,), (0, 1, 2), tuple(range(8)), (1, 3, 5, 6, 7)]):
            got = graph.run(decode_step(seqs_a, lens, step, rows))
            want = eager.run(decode_step(seqs_b, lens, step, rows))
            assert torch.equal(got, want)
            assert torch.equal(a.cache.k, b.cache.k) and torch.equal(a.cache.v, b.cache.v)
    assert graph.captured == [1, 4, 8]


@pytest.mark.gpu
def test_replayed_step_does_not_sync():
    lens = [5, 11, 3]
    (a, seqs), _ = cuda_pair(lens)
    runner = GraphRunner(a, max_num_seqs=4)
    with torch.inference_mode():
        runner.capture_all()
        batches = [decode_step(seqs, lens, s) for s in range(3)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches:
                runner.run(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert runner.captured == [1, 2, 4]
