"""`smollm3 serve`: the OpenAI-compatible HTTP server on one engine, or on Ray Serve replicas."""
from __future__ import annotations

import os

from .options import int_at_least, load_runtime

HELP = "an OpenAI-compatible HTTP server on the batching engine, with a chat page at /"
DESCRIPTION = ("Serve /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, /tokenize and "
               "/detokenize, as llama-server and vLLM do, and a chat page at /.")
PACKAGED_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_arguments(p) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int_at_least(1, 65535), default=8000, help="port to bind (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("SMOLLM3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SMOLLM3_API_KEY; none: open)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send and see (default: the --model argument)")
    g.add_argument("--max-num-seqs", type=int_at_least(1), default=64, metavar="N",
                   help="sequences decoded together (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int_at_least(1), default=512, metavar="N",
                   help="tokens per engine step (default: 512)")
    g.add_argument("--kv-cache-tokens", type=int_at_least(1), metavar="N",
                   help="tokens in the paged KV cache (default: 90%% of free GPU memory; on CPU 2 x max-seq-len)")
    g.add_argument("--max-waiting", type=int_at_least(0), default=256, metavar="N",
                   help="sequences that may wait beyond the running batch before requests get 503 (default: 256)")
    g.add_argument("--no-webui", dest="webui", action="store_false",
                   help="do not serve the chat page at / (the API stays)")
    r = p.add_argument_group("replicas on Ray Serve (pip install -e '.[ray]')")
    r.add_argument("--replicas", type=int_at_least(1), default=1, metavar="N",
                   help="engines behind one endpoint, each its own process (and GPU on CUDA); "
                        "above 1 a local Ray instance runs them (or the cluster $RAY_ADDRESS names)")
    r.add_argument("--min-replicas", type=int_at_least(0), metavar="N", help="autoscale from this many replicas")
    r.add_argument("--max-replicas", type=int_at_least(1), metavar="N", help="autoscale up to this many replicas")
    r.add_argument("--target-ongoing-requests", type=float, metavar="X",
                   help="autoscaling target of requests in flight per replica")


def run(args) -> int:
    from ..errors import RequestError

    name = args.served_model_name or args.model or PACKAGED_MODEL_NAME
    engine = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
              "kv_cache_tokens": args.kv_cache_tokens}
    autoscaling = {k: getattr(args, k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests")
                   if getattr(args, k) is not None}
    if args.replicas > 1 or autoscaling:
        try:
            from ..entrypoints.ray_serve import run_replicas
        except ImportError as e:
            raise RequestError(f"--replicas needs Ray Serve ({e}): pip install -e '.[ray]'") from None
        load = {"source": args.model, "quant": args.quant, "device": args.device, "dtype": args.dtype,
                "backend": args.backend, "max_seq_len": args.max_seq_len, "threads": args.threads, **engine}
        return run_replicas(load, host=args.host, port=args.port, served_model_name=name,
                            api_key=args.api_key or None, max_waiting=args.max_waiting, replicas=args.replicas,
                            autoscaling=autoscaling or None, webui=args.webui)
    from ..entrypoints.app import run_server

    return run_server(lambda: load_runtime(args, **engine), host=args.host, port=args.port,
                      served_model_name=name, api_key=args.api_key or None, max_waiting=args.max_waiting,
                      describe=args.model or f"the packaged {PACKAGED_MODEL_NAME}", webui=args.webui)
