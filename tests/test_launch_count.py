"""How many kernels a decode step of SmolLM3-3B launches (issue 22: at most 200).

Counted on the CPU: the Triton launches of one batch-1 pure decode step are recorded
without running the kernels (tests/helpers/decode_trace.py intercepts the launcher), and
every torch op that would be a GPU kernel is counted (a TorchDispatchMode; views and
allocations launch nothing). The model has SmolLM3-3B's structure at 1/64 width
(tests/helpers/synthetic.py's recipe: 36 layers, Q4_K_M's per-tensor types, mixed-type
QKV, the tied Q6_K LM head, NoPE every 4th layer): the launches do not depend on the
widths, so the count is SmolLM3-3B's. Also checked: the step reads no device value on
the host (CUDA-graph capturable), and a layer is five launches.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from smollm3_triton.backends import triton_backend  # noqa: E402
from tests.helpers import decode_trace  # noqa: E402

MAX_KERNELS_PER_STEP = 200


@pytest.fixture(scope="module")
def model():
    return decode_trace.model_like("smollm3-3b", "q4_k_m", scale=64, backend=triton_backend(cuda_graphs=False))


@pytest.mark.parametrize("batch", [1, 64])
def test_a_decode_step_launches_at_most_200_kernels(model, batch):
    step = decode_trace.decode_batch(model, batch, context=100)
    tr = decode_trace.trace(lambda: model.forward(step))
    names = [launch.name for launch in tr.launches]
    per_layer = len(names) // model.config.n_layers
    print(f"\ndecode step, batch {batch}: {len(names)} Triton launches + {len(tr.torch_ops)} torch kernels "
          f"({sorted(set(tr.torch_ops))}) = {tr.kernels}; per layer {per_layer}")
    assert tr.host_reads == []
    assert tr.kernels <= MAX_KERNELS_PER_STEP
    # Five per layer: QKV (+RoPE, KV write), attention, o (+residual), gate/up (+SwiGLU), down (+residual).
    assert names.count("_attn_decode_kernel") == model.config.n_layers
    assert len(names) == 5 * model.config.n_layers + 2       # + the embedding and the LM head
    # On an H200 every one of them is launched with programmatic dependent launch, its kernel
    # built to wait for the previous one (kernels/pdl.py; the wait's place: the compile tests).
    assert all(launch.launch_pdl and launch.args["PDL"] for launch in tr.launches)
    # Each asks for fused multiply-adds rather than triton's default (off from triton 3.10 on).
    assert all(launch.enable_fp_fusion is True for launch in tr.launches)


def test_a_gpu_before_sm90_launches_without_pdl(model):
    step = decode_trace.decode_batch(model, 1, context=100)
    a100 = decode_trace.DeviceProfile("A100", 108, 80)
    tr = decode_trace.trace(lambda: model.forward(step), a100)
    assert tr.launches and not any(launch.launch_pdl or launch.args["PDL"] for launch in tr.launches)


@pytest.mark.parametrize("arch,env,on", [(80, None, False), (90, None, True), (100, None, True), (120, None, False),
                                         (90, "0", False), (None, None, False)])
def test_pdl_is_picked_by_the_gpu_and_smollm3_pdl(monkeypatch, arch, env, on):
    from smollm3_triton.kernels import gpu, pdl
    monkeypatch.setattr(gpu, "arch_and_sms", lambda device: (arch, 132))
    if env is None:
        monkeypatch.delenv("SMOLLM3_PDL", raising=False)
    else:
        monkeypatch.setenv("SMOLLM3_PDL", env)
    assert pdl.launch_options(torch.device("cpu")) == (dict(PDL=True, launch_pdl=True) if on else dict(PDL=False))
