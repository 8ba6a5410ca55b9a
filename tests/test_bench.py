"""`smollm3 bench` (smollm3_triton.bench.run_bench) on CPU with a tiny synthetic file:
the JSON it writes, and its bytes-per-token figure against gguf-py's tensor sizes."""
import json

import pytest

from smollm3_triton.tools.bench import add_bench_arguments, main  # noqa: E402
from tests.helpers.synthetic import write_synthetic  # noqa: E402


def test_bench_on_cpu_writes_its_figures(tmp_path):
    import gguf
    path = write_synthetic(tmp_path / "tiny.gguf", "smollm2-1.7b", "q8_0", scale=64)
    out = tmp_path / "results.json"
    assert main(["--model", str(path), "--device", "cpu", "--prefill", "8,16", "--contexts", "4,20",
                 "--decode-tokens", "3", "--rounds", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    results = data["results"]
    # The CPU default (the cpu backend) timed over the rounds, then the exact torch reference once.
    assert [(r["kind"], r["length"], r["engine"]) for r in results] == [
        ("prefill", 8, "cpu"), ("prefill", 16, "cpu"), ("decode", 4, "cpu-eager"), ("decode", 20, "cpu-eager"),
        ("prefill", 8, "torch-eager"), ("prefill", 16, "torch-eager"), ("decode", 4, "torch-eager"),
        ("decode", 20, "torch-eager")]
    for r in results:
        assert r["tok_per_s"] > 0 and len(r["runs"]) == (2 if r["engine"] != "torch-eager" else 1)
    # a tied model reads every tensor of the file once per token (the embedding as the LM head)
    reader = gguf.GGUFReader(str(path))
    assert data["cost"]["weight_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    # K and V of 24 layers x 1 KV head x 256 (head_dim) in fp32, per position
    assert data["cost"]["kv_bytes_per_position"] == 2 * 24 * 1 * 256 * 4
    decode = results[3]
    assert decode["gb_per_s"] == pytest.approx(
        (data["cost"]["weight_bytes"] + 20 * data["cost"]["kv_bytes_per_position"]) * decode["tok_per_s"] / 1e9)


def test_bench_refuses_bad_lengths(tmp_path):
    from smollm3_triton.errors import RequestError
    with pytest.raises(RequestError, match="--prefill"):
        main(["--device", "cpu", "--prefill", "12,abc"])
    with pytest.raises(RequestError, match=">= 1"):
        main(["--device", "cpu", "--contexts", "0"])


def test_bench_arguments_can_leave_model_options_to_the_caller():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    add_bench_arguments(parser, model_options=False)
    args = parser.parse_args(["--model", "x.gguf", "--contexts", "64"])
    assert args.contexts == "64" and args.eager
