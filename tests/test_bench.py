"""`smollm3 bench` on CPU with a tiny synthetic file: the JSON it writes, its bytes-per-token
figure against gguf-py's tensor sizes, and its output as a user sees it."""
import json

import pytest

from smollm3_triton.cli import main
from tests.helpers.synthetic import write_synthetic


def test_bench_on_cpu_writes_its_figures(tmp_path, capsys):
    import gguf
    path = write_synthetic(tmp_path / "tiny.gguf", "smollm2-1.7b", "q8_0", scale=64)
    out = tmp_path / "results.json"
    assert main(["bench", "--model", str(path), "--device", "cpu", "--prefill", "8,16", "--contexts", "4,20",
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
    # K and V of 24 layers x 1 KV head x 256 (head_dim) per position, in the cache's dtype: fp16
    # where the cpu backend runs on the compiled kernels (as llama.cpp's cache), else fp32
    from smollm3_triton.kernels import cpu_native
    assert data["cost"]["kv_bytes_per_position"] == 2 * 24 * 1 * 256 * (2 if cpu_native.AVAILABLE else 4)
    decode = results[3]
    assert decode["gb_per_s"] == pytest.approx(
        (data["cost"]["weight_bytes"] + 20 * data["cost"]["kv_bytes_per_position"]) * decode["tok_per_s"] / 1e9)
    # A CPU is in no vendor table: its peaks are unknown and said so; the copy bandwidth is measured.
    assert data["device"]["peak_gbps"] is None and data["device"]["copy_gbps"] > 0
    achievable = (data["cost"]["weight_bytes"] + 20 * data["cost"]["kv_bytes_per_position"])
    assert decode["achievable_roofline_tok_per_s"] == pytest.approx(data["device"]["copy_gbps"] * 1e9 / achievable)
    stdout, stderr = capsys.readouterr()
    assert "?" not in stderr and "peak bandwidth unknown (not in the table" in stderr, stderr
    assert "bench [" in stderr and "8/8 cases" in stderr       # the progress, one line per case off a terminal
    assert len(stdout.strip().splitlines()) == 8               # one line per figure


@pytest.mark.parametrize("args, message", [
    (["--prefill", "12,abc"], "argument --prefill: must be comma-separated integers, got '12,abc'"),
    (["--contexts", "0"], "argument --contexts: values must be integers >= 1, got '0'"),
    (["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
])
def test_bench_refuses_bad_lengths_before_loading(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
