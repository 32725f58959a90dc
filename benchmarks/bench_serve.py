"""Load test of the model server (`python -m magicfuse.serve`, what `make serve` runs), then
the requests it must refuse, then a check that it still answers.

    .venv/bin/python benchmarks/bench_serve.py                                    # models:/magicfuse@champion of ./mlflow.db
    .venv/bin/python benchmarks/bench_serve.py --model artifacts/mkf/pipeline.pt  # a checkpoint, registered in a temporary store
    .venv/bin/python benchmarks/bench_serve.py --model models:/magicfuse/3 --tracking-uri sqlite:///other.db
    .venv/bin/python benchmarks/bench_serve.py --url http://127.0.0.1:5001        # a running server (make serve)
    .venv/bin/python benchmarks/bench_serve.py --requests 20 --clients 2 --size 320x240 --steps 1

Unless --url is given it starts the real server on 127.0.0.1 with a free port (its own
process group, --threads torch threads, default 1) and always takes it down, also on errors
and Ctrl-C. It sends --requests requests (default 200) of --size uint8 RGB images (default
640x480, four different images in turn) from --clients concurrent clients (default 4), each
asking for --steps DDIM steps through the request's params (default 2; 0 = the model's own
setting), and prints p50/p95/max latency, throughput and the failed requests; then each
wrong request of `magicfuse.serve.wrong_requests` (float image in [0, 1], text, not JSON, no
'inputs', H×W, 5 channels, booleans, values outside 0..255, empty, steps 0, a 50-megapixel
image) with its status and message; then whether a good request still gets 200. Exit status
1 if a request failed, a wrong request got anything but 4xx, or the server stopped answering.
The latencies include MLflow's JSON handling (a 640x480 image is about 4 MB of JSON each way),
which takes a large share of each request.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

from _common import parse_size  # noqa: E402
from magicfuse.serve import ServerProcess, post, request_body, wrong_requests  # noqa: E402


def _register_checkpoint(path: Path, store: Path) -> tuple[str, str]:
    """Log a pipeline checkpoint into a fresh sqlite store under `store`, registered as
    'magicfuse' with the @champion alias; returns (model URI, tracking URI)."""
    import mlflow

    from magicfuse import tracking

    uri = f"sqlite:///{store / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.pop("MAGICFUSE_PIPELINE_RUN_ID", None)
    tracking.configure(tracking_uri=uri)
    t0 = time.perf_counter()
    version = tracking.log_pipeline_model(path, registered_name="magicfuse", example_hw=(32, 48))
    mlflow.MlflowClient().set_registered_model_alias("magicfuse", "champion", version.version)
    print(f"registered {path} as magicfuse v{version.version} @champion in {uri} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return "models:/magicfuse@champion", uri


def _images(w: int, h: int, n: int = 4) -> list[np.ndarray]:
    """Smooth gradients with noise: `n` different uint8 RGB images of h×w."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        base = np.stack([xx / w, yy / h, 0.5 + 0.1 * i + 0.0 * xx], -1) * 200
        out.append(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def _load(url: str, bodies: list[bytes], n: int, clients: int, hw: tuple[int, int], timeout: float):
    """n requests from `clients` threads, each on its own keep-alive connection."""
    u = urllib.parse.urlsplit(url)
    counter, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        checked = False
        try:
            while True:
                with lock:
                    i = next(counter)
                if i >= n:
                    return
                t0 = time.perf_counter()
                try:
                    reply = post(url, bodies[i % len(bodies)], conn=conn, timeout=timeout)
                    ok = reply.status == 200 and reply.text.startswith('{"predictions"')
                    if ok and not checked:  # decode one reply per client: an image of the right size
                        out = np.asarray(json.loads(reply.text)["predictions"])
                        ok, checked = out.shape == (1, *hw, 3) and out.min() >= 0 and out.max() <= 255, True
                    why = None if ok else f"request {i}: status {reply.status}: {reply.message[:200]}"
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    why = f"request {i}: {type(exc).__name__}: {exc}"
                    conn.close()
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if why:
                        failures.append(why)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures, time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    w, h = args.size
    params = {"steps": args.steps} if args.steps else {}
    bodies = [request_body(img[None], {**params, "seed": i}) for i, img in enumerate(_images(w, h))]
    print(f"{args.requests} requests of {w}x{h} uint8 RGB images ({len(bodies[0]) / 1e6:.1f} MB of JSON each), "
          f"{args.clients} clients, params {params or '(model defaults)'}", flush=True)
    url = args.url.rstrip("/") + "/invocations"

    t0 = time.perf_counter()
    first = post(url, bodies[0], timeout=args.request_timeout)
    print(f"first request: status {first.status} in {time.perf_counter() - t0:.2f} s"
          + ("" if first.status == 200 else f": {first.message[:300]}"), flush=True)
    if first.status != 200:
        return 1

    lat, failures, wall = _load(url, bodies, args.requests, args.clients, (h, w), args.request_timeout)
    q = np.percentile(lat, [50, 95]) if lat else [float("nan")] * 2
    print(f"load: {len(lat)} requests in {wall:.1f} s = {len(lat) / wall:.2f} requests/s, "
          f"{len(failures)} failed; latency p50 {q[0]:.2f} s, p95 {q[1]:.2f} s, max {max(lat, default=float('nan')):.2f} s",
          flush=True)
    for f in failures[:10]:
        print(f"  failed: {f}")

    print("wrong requests (status, message):", flush=True)
    wrong_ok = True
    for name, body in wrong_requests().items():
        t0 = time.perf_counter()
        try:
            reply = post(url, body, timeout=args.request_timeout)
            status, msg = reply.status, " ".join(reply.message.split())
        except (OSError, http.client.HTTPException) as exc:
            status, msg = 0, f"{type(exc).__name__}: {exc}"
        good = 400 <= status < 500
        wrong_ok &= good
        print(f"  {name:26s} {status:3d} {'ok ' if good else 'BAD'} {time.perf_counter() - t0:5.2f} s  {msg[:220]}",
              flush=True)

    t0 = time.perf_counter()
    after = post(url, bodies[1], timeout=args.request_timeout)
    alive = after.status == 200
    print(f"after the wrong requests: a good request got {after.status} in {time.perf_counter() - t0:.2f} s "
          f"({'still answering' if alive else 'NOT ANSWERING'})", flush=True)
    return 0 if (not failures and wrong_ok and alive) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5001 (else one is started)")
    src.add_argument("--model", default="models:/magicfuse@champion",
                     help="an MLflow model URI, or a pipeline checkpoint (.pt) registered in a temporary store")
    p.add_argument("--tracking-uri", help="MLflow store of --model (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--size", type=parse_size, default=(640, 480), help="WIDTHxHEIGHT (default 640x480)")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps per request (default 2; 0: the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server (default 1)")
    p.add_argument("--device", default="cpu", help="device of the started server (default cpu)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for the server to start")
    args = p.parse_args(argv)
    if args.requests < 1 or args.clients < 1:
        p.error("--requests and --clients must be >= 1")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks on SIGTERM too
    if args.url:
        return run(args)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model, tracking_uri = args.model, args.tracking_uri
        if Path(model).is_file():
            import torch

            torch.set_num_threads(1)
            model, tracking_uri = _register_checkpoint(Path(model).resolve(), Path(tmp))
        server = ServerProcess(model, tracking_uri=tracking_uri, startup_timeout=args.startup_timeout,
                               args=["--threads", str(args.threads), "--device", args.device, "--log-level", "warning"])
        t0 = time.perf_counter()
        try:
            server.start()
            print(f"server {server.url} ({model}) answered /ping after {time.perf_counter() - t0:.0f} s", flush=True)
            args.url = server.url
            return run(args)
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
