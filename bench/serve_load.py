"""Load generator for an OpenAI-compatible server on this machine (loopback only).

    python bench/serve_load.py --start ours --model PATH --clients 8 --requests 64 --max-tokens 64
    python bench/serve_load.py --start llama --llama-server /path/to/llama-server --model PATH ...
    python bench/serve_load.py --url http://127.0.0.1:8000 ...        # a server already running
    python -m bench.serve_load --compare --model FILE --llama-server BIN [--clients 1 4 16] [--busy 0 2]

N clients each send streaming /v1/completions requests back to back (greedy, ignore_eos, a
different prompt each) until --requests are done or --duration seconds pass. Reports
requests/s, output tokens/s, time to first token and inter-token latency (p50 / p99), as
JSON and as a markdown row. --start launches the server on a free loopback port, waits
for /health, and stops it afterwards.

--compare: `smollm3 serve` beside llama-server on the same file and --threads, for every
--clients count (both servers started for it, each sized for that many streams) and every
--busy count (that many busy-looping processes on the cores during those runs, as in
bench/cpu_fast_speed.py); --rounds rounds, each running ours then llama-server's load,
medians and the ratio of output tokens/s at the end. Requests per run: max(8, 4 x clients).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(http: httpx.AsyncClient, url: str, model: str | None, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if model:
        body["model"] = model
    start = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    if not stamps:
        return {"error": "no tokens"}
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "latency": stamps[-1] - start}


async def run_load(url: str, model: str | None, clients: int, requests: int, duration: float,
                   max_tokens: int) -> dict:
    results: list[dict] = []
    counter = iter(range(requests))
    deadline = time.monotonic() + duration

    async def client(http):
        for i in counter:
            if time.monotonic() > deadline:
                return
            prompt = f"Request {i}: write a short story about the number {i * 37 % 1000} and a lighthouse."
            results.append(await one_request(http, url, model, prompt, max_tokens))

    # A fresh connection per request: llama-server closes a streamed response's connection
    # under httpx's feet when it is reused (RemoteProtocolError); loopback connects are cheap.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(duration + 60), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    return {"clients": clients, "requests": len(ok), "errors": len(results) - len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_ms": 1e3 * percentile([r["ttft"] for r in ok], 0.5),
            "ttft_p99_ms": 1e3 * percentile([r["ttft"] for r in ok], 0.99),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(kind: str, model: str, args) -> str:
    """Launch `smollm3 serve` or llama-server on a free loopback port; yield its URL."""
    port = _free_port()
    if kind == "ours":
        cmd = [sys.executable, "-m", "smollm3_triton", "serve", "--port", str(port),
               "--max-num-seqs", str(args.n_clients), "--max-seq-len", str(args.ctx)]
        if model:
            cmd += ["--model", model]
        if args.replicas > 1:
            cmd += ["--replicas", str(args.replicas)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
    else:
        # -np slots of ctx tokens each (llama-server splits -c among them); continuous batching on.
        cmd = [args.llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(port),
               "-np", str(args.n_clients), "-c", str(args.ctx * args.n_clients), "-t",
               str(args.threads or os.cpu_count()),
               "--no-webui"] if model else []
        if not cmd:
            raise SystemExit("--start llama needs --model (a .gguf file)")
    log = open(args.log or os.devnull, "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{kind} server exited with {proc.returncode}: {' '.join(cmd)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} server not healthy after 300 s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def compare(args) -> int:
    import statistics

    from bench.cpu_fast_speed import busy
    keys = ("output_tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")
    rows = []
    for clients in args.clients:
        args.n_clients = clients
        requests = max(8, 4 * clients)
        with started("ours", args.model, args) as ours, started("llama", args.model, args) as llama:
            names = {"ours": (ours, args.model), "llama": (llama, None)}     # (url, the model field to send)
            for url, model in names.values():       # warm-up: first-request allocations
                asyncio.run(run_load(url, model, 1, 1, args.duration, 4))
            runs = {(b, name): [] for b in args.busy for name in ("ours", "llama")}
            for r in range(args.rounds):
                for n_busy in args.busy:
                    with busy(n_busy):
                        for name, (url, model) in names.items():
                            res = asyncio.run(run_load(url, model, clients, requests, args.duration, args.max_tokens))
                            runs[n_busy, name].append(res)
                            print(f"round {r + 1} clients {clients} busy {n_busy} {name:5s} "
                                  f"{res['output_tokens_per_s']:7.1f} tok/s, {res['requests']}/{requests} requests, "
                                  f"ITL p50 {res['itl_p50_ms']:.1f} ms, load {os.getloadavg()[0]:.2f}", flush=True)
        for n_busy in args.busy:
            med = {name: {k: statistics.median(x[k] for x in runs[n_busy, name]) for k in keys}
                   for name in ("ours", "llama")}
            rows.append((clients, n_busy, med))
    print(f"\nmedians of {args.rounds} rounds, {args.max_tokens} tokens a request, threads {args.threads or os.cpu_count()}")
    print("| clients | busy processes | ours tok/s | llama-server tok/s | ours / llama | TTFT p50 ms ours / llama "
          "| ITL p50 ms ours / llama | ITL p99 ms ours / llama |")
    print("| --- " * 8 + "|")
    for clients, n_busy, m in rows:
        o, l_ = m["ours"], m["llama"]
        print(f"| {clients} | {n_busy} | {o['output_tokens_per_s']:.1f} | {l_['output_tokens_per_s']:.1f} | "
              f"{o['output_tokens_per_s'] / l_['output_tokens_per_s']:.2f}x | {o['ttft_p50_ms']:.0f} / "
              f"{l_['ttft_p50_ms']:.0f} | {o['itl_p50_ms']:.1f} / {l_['itl_p50_ms']:.1f} | "
              f"{o['itl_p99_ms']:.1f} / {l_['itl_p99_ms']:.1f} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (loopback only)")
    p.add_argument("--start", choices=["ours", "llama"], help="launch this server for the run")
    p.add_argument("--model", help="model for --start (ours: any source; llama: a .gguf)")
    p.add_argument("--served-model-name", help="the model field to send (default: none)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", "llama-server"))
    p.add_argument("--replicas", type=int, default=1, help="ours: engines behind the endpoint (Ray Serve)")
    p.add_argument("--compare", action="store_true", help="ours beside llama-server (see above)")
    p.add_argument("--clients", type=int, nargs="+", default=[8], help="one count; with --compare, several")
    p.add_argument("--busy", type=int, nargs="+", default=[0], help="--compare: busy-looping processes per setting")
    p.add_argument("--rounds", type=int, default=3, help="--compare: rounds")
    p.add_argument("--requests", type=int, default=64, help="total requests (bounded)")
    p.add_argument("--duration", type=float, default=120, help="stop sending after this many seconds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    p.add_argument("--threads", type=int, help="CPU threads of the server (of each replica; default: every core)")
    p.add_argument("--log", help="append the server's output here")
    p.add_argument("--json", type=Path, help="write the result here too")
    args = p.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1 or args.duration <= 0 or args.rounds < 1 or min(args.busy) < 0:
        p.error("--clients, --requests, --rounds and --duration must be positive, --busy >= 0")
    if args.compare:
        if not args.model:
            p.error("--compare needs --model (a .gguf file both servers load)")
        return compare(args)
    if len(args.clients) != 1:
        p.error("several --clients counts need --compare")
    args.n_clients = args.clients[0]
    if (args.url is None) == (args.start is None):
        p.error("give exactly one of --url and --start")
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(started(args.start, args.model, args))
        if urlparse(url).hostname not in LOOPBACK:
            p.error(f"{url}: this load generator only talks to loopback addresses")
        model = args.served_model_name or (args.model if args.start == "ours" else None)
        result = asyncio.run(run_load(url.rstrip("/"), model, args.n_clients, args.requests, args.duration,
                                      args.max_tokens))
    result["server"] = (f"{args.start} x{args.replicas}" if args.replicas > 1 else args.start) or url
    print(json.dumps(result, indent=2))
    print(f"| {result['server']} | {args.n_clients} | {result['requests']} | {result['requests_per_s']:.2f} | "
          f"{result['output_tokens_per_s']:.1f} | {result['ttft_p50_ms']:.0f} / {result['ttft_p99_ms']:.0f} | "
          f"{result['itl_p50_ms']:.1f} / {result['itl_p99_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
