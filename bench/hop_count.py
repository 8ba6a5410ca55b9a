"""Module boundaries one streamed chat request crosses, HTTP in to SSE out.

    python -m bench.hop_count

Traces every Python call in the package (all threads) while one streamed
/v1/chat/completions request (8 greedy tokens from the packaged SmolLM2-135M) is served by
an in-process server on 127.0.0.1, after one untraced warm-up request, and counts the
distinct caller-module -> callee-module edges inside the package (a call from a function of
one module into a function of another, intermediate frames outside the package skipped),
and the distinct function-to-function calls across modules."""
import socket
import sys
import threading
import time

import httpx

PKG = "smollm3_triton"

def module_of(frame):
    name = frame.f_globals.get("__name__", "")
    return name if name.startswith(PKG) else None

edges, modules, fedges = set(), set(), set()
active = [False]

def prof(frame, event, arg):
    if not active[0] or event != "call":
        return
    callee = module_of(frame)
    if callee is None:
        return
    modules.add(callee)
    back = frame.f_back
    while back is not None and module_of(back) is None:
        back = back.f_back
    caller = module_of(back) if back is not None else None
    if caller is not None and caller != callee:
        edges.add((caller, callee))
        fedges.add((caller, back.f_code.co_name, callee, frame.f_code.co_name))

def main():
    threading.setprofile(prof); sys.setprofile(prof)
    import uvicorn

    from smollm3_triton import Runtime
    from smollm3_triton.entrypoints.app import create_app
    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
    app = create_app(lambda: Runtime.load(None, max_seq_len=512), served_model_name="m")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True); t.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health").status_code == 200: break
        except httpx.HTTPError: pass
        time.sleep(0.1)
    body = {"model": "m", "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    # warm-up (imports, first-call paths), then the traced request
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        for _ in r.iter_lines(): pass
    active[0] = True
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        for _ in r.iter_lines(): pass
    active[0] = False; sys.setprofile(None); threading.setprofile(None)
    server.should_exit = True; t.join(10)
    print(f"{len(fedges)} distinct cross-module calls (function to function)")
    print(f"{len(edges)} module boundaries crossed over {len(modules)} modules")
    for a, b in sorted(edges): print(f"  {a} -> {b}")

main()
