"""`smollm3 serve` on Ray Serve: two replicas of a small model behind Ray's HTTP proxy on
127.0.0.1, driven by the openai client. Slow (Ray starts its processes): bounded in
requests and time."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from smollm3_triton import Runtime  # noqa: E402
from tests.helpers.serve_util import free_port, metric, running_server, tiny_folder  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [f"Question {i}: what comes after {i}?" for i in range(40)]


def ask(client, prompt):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
    return raw.headers, raw.parse().choices[0].message.content


def wait_healthy(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{base} not healthy in {timeout} s"
        time.sleep(0.5)


def test_two_replicas_behind_one_endpoint(tmp_path):
    import ray

    from smollm3_triton.entrypoints.ray_serve import build_app

    folder = tiny_folder(tmp_path)
    load = {"source": str(folder), "device": "cpu", "max_seq_len": 256, "kv_cache_tokens": 2048}
    with running_server(lambda: Runtime.load(**load)) as (single, _):
        alone = openai.OpenAI(base_url=single + "/v1", api_key="x", max_retries=0, timeout=60)
        expected = [ask(alone, p)[1] for p in PROMPTS]

    port = free_port()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"        # Ray would report usage over the network
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=2**28)          # small: nothing but requests goes through it
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(load, served_model_name="tiny", replicas=2, num_cpus=0.5), name="smollm3",
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 120)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda p: ask(client, p), PROMPTS))
        print(f"40 requests through 2 replicas in {time.monotonic() - t0:.1f} s")
        assert [text for _, text in results] == expected

        # Both replicas served: each one's own counters, read from its own /metrics.
        replicas = {h["x-smollm3-replica"]: (h["x-smollm3-metrics"], int(h["x-smollm3-replica-pid"]))
                    for h, _ in results}
        assert len(replicas) == 2
        served = {r: metric(httpx.get(url).text, "smollm3:generation_tokens_total") for r, (url, _) in replicas.items()}
        assert all(v > 0 for v in served.values())

        # A conversation named in the header stays on one replica, whose prefix cache then
        # serves each turn's history.
        for conversation in range(3):    # by chance alone: all turns on one replica 1 time in 4, each
            history, seen = [], set()
            for turn in range(3):
                history.append({"role": "user", "content": f"Turn {turn}: tell me more about lighthouse {conversation}."})
                raw = client.chat.completions.with_raw_response.create(
                    model="tiny", messages=history, max_tokens=8, temperature=0,
                    extra_headers={"serve_multiplexed_model_id": f"conversation-{conversation}"})
                seen.add(raw.headers["x-smollm3-replica"])
                history.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
                cached = raw.parse().usage.prompt_tokens_details.cached_tokens
            assert len(seen) == 1 and cached > 0

        # Streaming through Ray's proxy; then the replica serving a stream is killed: the
        # stream fails (an error or a cut connection, never a hang) and the endpoint keeps
        # answering from the other replica while Ray restarts the dead one.
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200,
                "temperature": 0, "stream": True, "ignore_eos": True}
        t0 = time.monotonic()
        with pytest.raises((httpx.HTTPError, AssertionError)):
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(int(r.headers["x-smollm3-replica-pid"]), signal.SIGKILL)
                rest = [line for line in lines if line]
                assert rest and rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
        assert time.monotonic() - t0 < 30
        answered, deadline = 0, time.monotonic() + 60
        while answered < 10 and time.monotonic() < deadline:
            try:
                headers, _ = ask(client, "still there?")
                answered += 1
            except openai.APIError:
                time.sleep(0.2)          # the proxy may still pick the dead replica once
        assert answered == 10
        # Ray brings the killed replica back: two live replicas again, one of them new.
        deadline, seen = time.monotonic() + 120, set()
        while time.monotonic() < deadline and len(seen - set(replicas)) == 0:
            try:
                seen.add(ask(client, "who?")[0]["x-smollm3-replica"])
            except openai.APIError:
                time.sleep(0.5)
        assert seen - set(replicas), "Ray did not restart the killed replica"
    finally:
        serve.shutdown()
        ray.shutdown()
