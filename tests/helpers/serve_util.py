"""A real `smollm3 serve` app on 127.0.0.1 inside a test: uvicorn on a free port in a
background thread, stopped at the end; and the models the server tests run."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import torch

from tests.helpers.gguf_export import random_hf_model, save_hf_folder

SMOLLM3_TEMPLATE = Path(__file__).parents[1] / "data" / "smollm3_chat_template.jinja"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_folder(tmp: Path, kind: str = "llama", template: Path | None = None) -> Path:
    """A small random HF folder (SmolLM2 vocabulary and tokenizer): fast enough for a
    hundred concurrent requests on two cores. template: a chat template file to carry
    instead of SmolLM2's."""
    hf = random_hf_model(kind, seed=3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, **({"head_dim": 32} if kind == "llama" else {}))
    folder = save_hf_folder(hf, tmp / f"{kind}-tiny")
    if template is not None:
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = template.read_text()
        cfg_path.write_text(json.dumps(cfg))
    return folder


@contextlib.contextmanager
def running_server(load, *, timeout: float = 120, **app_options):
    """Yields (base_url, app) once /health answers 200; the server stops on exit."""
    import httpx
    import uvicorn

    from smollm3_triton.entrypoints.app import create_app

    app = create_app(load, served_model_name=app_options.pop("served_model_name", "tiny"), **app_options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server on {base} did not become healthy in {timeout} s")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class ScriptedRunner:
    """A test hook in place of the model runner's forward: the real forward runs (the KV cache
    fills as usual), then every sampled row's logits are replaced so that the next token is
    the next of `script` — a crafted model output, for what a random model never writes."""

    def __init__(self, model, script: list[int]):
        self.model, self.script, self.i = model, list(script), 0

    def __call__(self, batch):
        logits = self.model.forward(batch)
        if logits.shape[0]:
            token = self.script[min(self.i, len(self.script) - 1)]
            self.i += 1
            logits = torch.full_like(logits, -30.0)
            logits[:, token] = 30.0
        return logits


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text (the first sample of that name)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def metrics_once_idle(base: str, within_s: float) -> str:
    """/metrics polled until no sequence runs (an aborted one leaves within a step), bounded in
    time; asserts nothing runs or waits and every KV block is free, and returns the last text."""
    import httpx

    deadline = time.monotonic() + within_s
    while True:
        m = httpx.get(base + "/metrics").text
        if metric(m, "smollm3:num_requests_running") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert metric(m, "smollm3:num_requests_running") == 0 and metric(m, "smollm3:num_requests_waiting") == 0
    assert metric(m, "smollm3:kv_cache_blocks_free") == metric(m, "smollm3:kv_cache_blocks_total")
    return m


def hf_prompt_len(folder, messages, **kwargs) -> int:
    """The prompt's length in tokens as transformers renders the folder's chat template: the
    oracle for what a request's messages become."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=True, **kwargs)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
