"""The server of `smollm3 serve` as a Ray Serve deployment: N replicas, one engine each,
behind Ray's HTTP proxy on one OpenAI endpoint.

    smollm3 serve --replicas 2 ...                        # a local Ray instance + the deployment
    serve run smollm3_triton.entrypoints.ray_serve:app_builder model=PATH replicas=2   # or a cluster config

Each replica builds the same FastAPI app (`server.create_app`) and its own Runtime; Ray
routes requests (power of two choices on ongoing requests), restarts a replica that
dies, and streams server-sent events through its proxy. Every response says which
replica answered (`x-smollm3-replica`), and each replica serves its own Prometheus
metrics on a loopback port it names in `x-smollm3-metrics`: Ray's proxy gives no way to
reach one replica's /metrics route. A client that names its conversation in the
`serve_multiplexed_model_id` header has every turn routed to the same replica, so
the prefix cache there serves the conversation so far.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random

from ray import serve
from ray.serve.request_router import RequestRouter

log = logging.getLogger("smollm3.ray")


def _replica_app(load_options: dict, served_model_name: str, api_key: str | None, max_waiting: int, webui: bool):
    """Runs on each replica when it starts: its own Runtime, and the app serving it."""
    from prometheus_client import start_http_server

    from ..runtime import Runtime
    from .app import create_app

    replica = serve.get_replica_context().replica_id.unique_id
    # Loaded before the replica counts as started, so Ray never routes to one still loading.
    rt = Runtime.load(**load_options)
    app = create_app(lambda: rt, served_model_name=served_model_name, api_key=api_key, max_waiting=max_waiting,
                     webui=webui)
    metrics_server, _ = start_http_server(0, addr="127.0.0.1", registry=app.state.smollm3.metrics.registry)
    headers = {"x-smollm3-replica": f"{replica}", "x-smollm3-replica-pid": str(os.getpid()),
               "x-smollm3-metrics": f"http://127.0.0.1:{metrics_server.server_port}/metrics"}

    @app.middleware("http")
    async def name_the_replica(request, call_next):
        response = await call_next(request)
        response.headers.update(headers)
        return response

    return app


class ConversationRouter(RequestRouter):
    """Requests with the same `serve_multiplexed_model_id` header (a conversation id) go to
    the same replica, whose prefix cache holds that conversation: replicas ranked by
    rendezvous hash of (id, replica), the next taking over when the first is full or gone.
    Without the header: two random replicas, the less loaded first (power of two choices,
    Ray's default)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if key:
            def rank(r):
                return hashlib.blake2b(f"{key}\0{r.replica_id.unique_id}".encode(), digest_size=8).digest()
            return [[r] for r in sorted(candidate_replicas, key=rank)]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


def build_app(load_options: dict, *, served_model_name: str, api_key: str | None = None, max_waiting: int = 256,
              replicas: int = 1, num_cpus: float = 1, num_gpus: float | None = None,
              autoscaling: dict | None = None, webui: bool = True):
    """The Ray Serve application. load_options: Runtime.load's keywords (source, quant,
    device, max_seq_len, ...). num_gpus per replica (default: 1 when CUDA is present).
    autoscaling: Ray's autoscaling_config (min_replicas, max_replicas,
    target_ongoing_requests); it replaces the fixed `replicas`."""
    if num_gpus is None:
        import torch
        num_gpus = 1 if torch.cuda.is_available() and load_options.get("device") in (None, "cuda") else 0
    load_options = dict(load_options)

    def builder():              # Ray calls a plain function with no arguments on each replica
        return _replica_app(load_options, served_model_name, api_key, max_waiting, webui)

    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    # The engine batches on its own: Ray may hand a replica as many requests as it can hold.
    max_ongoing = load_options.get("max_num_seqs", 64) + max_waiting
    deployment = serve.deployment(serve.ingress(builder)(type("SmolLM3Server", (), {})), name="smollm3",
                                  ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                                  max_ongoing_requests=max_ongoing, health_check_period_s=2,
                                  health_check_timeout_s=30, **scaling,
                                  request_router_config={"request_router_class": ConversationRouter})
    return deployment.bind()


def app_builder(args: dict):
    """For `serve run smollm3_triton.entrypoints.ray_serve:app_builder key=value ...` and Ray Serve
    config files: model, quant, device, max_seq_len, max_num_seqs, kv_cache_tokens,
    served_model_name, api_key, replicas, num_cpus, num_gpus, min_replicas,
    max_replicas, target_ongoing_requests."""
    args = dict(args)
    ints = ("max_seq_len", "max_num_seqs", "kv_cache_tokens", "replicas", "min_replicas", "max_replicas")
    for key in ints:
        if key in args:
            args[key] = int(args[key])
    load = {"source": args.get("model"), "quant": args.get("quant"), "device": args.get("device")}
    for key in ("max_seq_len", "max_num_seqs", "kv_cache_tokens"):
        if key in args:
            load[key] = args[key]
    autoscaling = {k: (int(args[k]) if k != "target_ongoing_requests" else float(args[k]))
                   for k in ("min_replicas", "max_replicas", "target_ongoing_requests") if k in args} or None
    return build_app(load, served_model_name=args.get("served_model_name") or args.get("model") or
                     "SmolLM2-135M-Instruct", api_key=args.get("api_key") or os.environ.get("SMOLLM3_API_KEY"),
                     replicas=args.get("replicas", 1), num_cpus=float(args.get("num_cpus", 1)),
                     num_gpus=float(args["num_gpus"]) if "num_gpus" in args else None, autoscaling=autoscaling)


def run_replicas(load_options: dict, *, host: str, port: int, served_model_name: str, api_key: str | None,
                 max_waiting: int, replicas: int, autoscaling: dict | None = None, webui: bool = True) -> int:
    """`smollm3 serve --replicas N`: a local Ray instance (or the cluster RAY_ADDRESS names),
    the deployment on host:port, until SIGINT/SIGTERM; exit status 0."""
    import signal
    import threading

    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")     # no usage reports sent anywhere
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=max(replicas, os.cpu_count() or 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(load_options, served_model_name=served_model_name, api_key=api_key,
                            max_waiting=max_waiting, replicas=replicas, autoscaling=autoscaling, webui=webui),
                  name="smollm3", route_prefix="/")
        log.info("smollm3 serve: %d replica(s) of %s as %r on http://%s:%d", replicas,
                 load_options.get("source") or "the packaged SmolLM2-135M-Instruct", served_model_name, host, port)
        stop.wait()
        log.info("stopping the deployment")
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
    return 0
