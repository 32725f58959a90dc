"""Serve a registered MagicFuse pipeline over HTTP: MLflow's scoring server, in one command.

    .venv/bin/python -m magicfuse.serve [--model models:/magicfuse@champion] [--host 127.0.0.1]
        [--port 5001] [--tracking-uri URI] [--device auto] [--threads N] [--max-pixels N]
        [--max-body-mb N] [--timeout 60]
    make serve [MODEL=...] [HOST=...] [PORT=...]

The protocol is MLflow's (`mlflow models serve`): ``POST /invocations`` with JSON
``{"inputs": <RGB image(s) as integers 0..255>, "params": {"seed": 0, "steps": 25, ...}}``
answers ``{"predictions": <MagImgs>}``; ``GET /ping``, ``/health``, ``/version``. The model
store is the one `make run` writes (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``mlflow.db`` in the working directory: :mod:`magicfuse.mlflow_store`).

It runs MLflow's own app (``mlflow.pyfunc.scoring_server.init``) under uvicorn in this
process — ``mlflow models serve --env-manager local`` shells out to a ``uvicorn`` found on
PATH and exits with status 127 outside an activated environment — with two changes:

* **the numbers reach the model as they were sent.** For a model whose signature declares a
  uint8 tensor, MLflow's JSON parser (``mlflow.utils.proto_json_utils.convert_data_type``)
  runs ``np.array(data, dtype=uint8)`` before any check, which truncates a float image in
  [0, 1] to zeros: the old server answered 200 with a black MagImg. The served model is
  loaded without its input schema (the logged signature is unchanged), so the JSON is
  parsed as sent and the pipeline's own check
  (:func:`magicfuse.inference.check_pyfunc_input`) refuses floats, text, booleans, wrong
  shapes, empty input, values outside 0..255 and more than ``--max-pixels`` pixels with
  status 400 and a message naming the problem (the same check runs for Python callers);
* **request bodies are bounded before they are read**: a body larger than ``--max-body-mb``
  (default: room for ``--max-pixels`` RGB pixels written as JSON, 24 bytes each) gets 413,
  one without a Content-Length 411.

For scripts and tests, :class:`ServerProcess` runs the server in a child process on a free
port and always takes it down; :func:`post` sends a request (a :class:`StreamedBody` is
announced with ``Expect: 100-continue`` and only sent if the server wants it), and
:func:`wrong_requests` builds the refused requests that ``benchmarks/bench_serve.py`` and
``tests/test_serving.py`` send.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from magicfuse.errors import ConfigError, MagicFuseError
from magicfuse.inference import PYFUNC_MAX_PIXELS, _PyfuncMethods
from magicfuse.mlflow_store import use_tracking_store
from magicfuse.tracking.models import load_model
from magicfuse.tracking.runs import TrackingError

DEFAULT_MODEL = "models:/magicfuse@champion"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
DEFAULT_TIMEOUT_S = 60
JSON_BYTES_PER_PIXEL = 24  # "[255, 255, 255], " is 17: room for spaces and line breaks
_MIB = 1 << 20


def default_max_body_bytes(max_pixels: int | None) -> int | None:
    """The body limit that leaves room for ``max_pixels`` RGB pixels written as JSON."""
    return None if max_pixels is None else int(max_pixels) * JSON_BYTES_PER_PIXEL + _MIB


# ----------------------------------------------------------------------------- the server


def load_served_model(model: str = DEFAULT_MODEL, *, tracking_uri: str | None = None, device: str = "auto",
                      max_pixels: int | None = PYFUNC_MAX_PIXELS) -> Any:
    """The MLflow pyfunc model to serve: a MagicFuse pipeline model (refuses any other),
    loaded without its input schema so that MLflow does not cast the JSON to uint8 before
    the pipeline's check sees it (see the module docstring). Raises MagicFuseError."""
    from mlflow.models import ModelSignature

    uri = use_tracking_store(tracking_uri)
    try:
        pyfunc = load_model(model)
    except TrackingError as exc:
        raise TrackingError(f"{exc} (tracking store {uri}; `make run` registers models:/magicfuse@champion, "
                            "--model and --tracking-uri choose another)") from None
    try:
        impl = pyfunc.unwrap_python_model()
    except Exception:  # noqa: BLE001 - MLflow raises MlflowException for non-PythonModel flavours
        impl = None
    if not isinstance(impl, _PyfuncMethods):
        raise ConfigError(f"{model}: not a MagicFuse pipeline model (its python model is "
                          f"{type(impl).__name__}); serve a version of the registered model 'magicfuse'")
    # MLflow hands model_config only to models logged with one, so the settings go in directly
    impl.configure(device=device, max_pixels=max_pixels)
    sig = pyfunc.metadata.signature
    if sig is not None and sig.inputs is not None:
        pyfunc.metadata.signature = ModelSignature(inputs=None, outputs=sig.outputs, params=sig.params)
    return pyfunc


def _refusal(status: int, code: str, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error_code": code, "message": message}, status_code=status,
                        headers={"Connection": "close"})


def build_app(pyfunc: Any, *, max_body_bytes: int | None, max_pixels: int | None) -> Any:
    """MLflow's scoring app for ``pyfunc`` with the request-body limit in front of it."""
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(pyfunc)

    @app.middleware("http")
    async def limit_body(request: Any, call_next: Callable) -> Any:  # runs before MLflow reads the body
        if request.method in ("POST", "PUT") and max_body_bytes is not None:
            length = request.headers.get("content-length")
            if length is None:
                return _refusal(411, "LENGTH_REQUIRED", "send the request with a Content-Length header "
                                                        "(chunked request bodies are not accepted)")
            try:
                n = int(length)
            except ValueError:
                return _refusal(400, "BAD_REQUEST", f"Content-Length {length!r} is not a number")
            if n > max_body_bytes:
                limit = f"{max_pixels:,} pixels per request" if max_pixels is not None else "a bounded size"
                return _refusal(413, "REQUEST_TOO_LARGE",
                                f"request body of {n:,} bytes is larger than the limit of {max_body_bytes:,} bytes: "
                                f"this server takes images up to {limit} (magicfuse.serve --max-pixels, "
                                "--max-body-mb); send smaller images or fewer per request")
        return await call_next(request)

    return app


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(model: str = DEFAULT_MODEL, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          tracking_uri: str | None = None, device: str = "auto", threads: int | None = None,
          max_pixels: int | None = PYFUNC_MAX_PIXELS, max_body_bytes: int | None = None,
          timeout_s: int = DEFAULT_TIMEOUT_S, port_file: str | Path | None = None, log_level: str = "info") -> None:
    """Load ``model`` and serve it until interrupted (SIGINT/SIGTERM). ``port`` 0 picks a free
    port; ``port_file`` receives the port once the socket is bound."""
    import uvicorn

    if threads:
        torch.set_num_threads(int(threads))
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(max_pixels)
    # read by scoring_server.init: a request running longer gets 504 (its prediction still finishes)
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(timeout_s))
    pyfunc = load_served_model(model, tracking_uri=tracking_uri, device=device, max_pixels=max_pixels)
    app = build_app(pyfunc, max_body_bytes=max_body_bytes, max_pixels=max_pixels)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    if port_file is not None:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(str(bound))
        os.replace(tmp, port_file)
    print(f"magicfuse serve: {model} on http://{host}:{bound} (POST /invocations, GET /ping); "
          f"at most {'no limit' if max_pixels is None else f'{max_pixels:,}'} pixels and "
          f"{'no limit' if max_body_bytes is None else f'{max_body_bytes:,}'} body bytes per request", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=30)).run(sockets=[sock])


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1 or value != float(text):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _pixels(text: str) -> int | None:
    return None if text.lower() in ("0", "none") else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magicfuse.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"MLflow model URI (default {DEFAULT_MODEL})")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    p.add_argument("--port-file", help="write the port here once listening (with --port 0)")
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-pixels", type=_pixels, default=PYFUNC_MAX_PIXELS,
                   help=f"most pixels per request, all images together (default {PYFUNC_MAX_PIXELS:,} = 3840x2160; "
                        "0: no limit)")
    p.add_argument("--max-body-mb", type=float,
                   help=f"largest request body in MiB (default: {JSON_BYTES_PER_PIXEL} bytes per allowed pixel + 1)")
    p.add_argument("--timeout", type=_positive_int, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds before a request gets 504 (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    max_body = None if args.max_body_mb is None else int(args.max_body_mb * _MIB)
    try:
        serve(args.model, host=args.host, port=args.port, tracking_uri=args.tracking_uri, device=args.device,
              threads=args.threads, max_pixels=args.max_pixels, max_body_bytes=max_body, timeout_s=args.timeout,
              port_file=args.port_file, log_level=args.log_level)
    except MagicFuseError as exc:
        print(f"magicfuse serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class StreamedBody:
    """A request body too large to hold: ``length`` bytes from ``chunks()``."""

    length: int
    chunks: Callable[[], Iterator[bytes]]


@dataclass(frozen=True)
class Reply:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def message(self) -> str:
        """The error message of an MLflow/MagicFuse error reply (without MLflow's
        'Failed to predict data ...' echo of the input), else the text."""
        try:
            msg = str(self.json().get("message", self.text))
        except (ValueError, AttributeError):
            msg = self.text
        return msg.rsplit("\nError: ", 1)[-1].strip()


def request_body(images: Any, params: Mapping[str, Any] | None = None) -> bytes:
    """The JSON body MLflow's server takes: ``{"inputs": images, "params": params}``."""
    payload: dict[str, Any] = {"inputs": images.tolist() if isinstance(images, np.ndarray) else images}
    if params:
        payload["params"] = dict(params)
    return json.dumps(payload, separators=(",", ":")).encode()


def _read_reply(f: Any) -> Reply:
    line = f.readline()
    if not line:
        raise ConnectionError("the server closed the connection without a reply")
    status = int(line.split()[1])
    headers = {}
    while (h := f.readline().strip()):
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if status < 200:
        return Reply(status, "")
    n = headers.get("content-length")
    return Reply(status, (f.read(int(n)) if n is not None else f.read()).decode("utf-8", "replace"))


def post(url: str, body: bytes | StreamedBody, *, timeout: float = 120.0,
         content_type: str = "application/json", conn: http.client.HTTPConnection | None = None) -> Reply:
    """POST ``body`` to ``url``. Bytes go through ``conn`` (reused) or a new connection; a
    :class:`StreamedBody` is announced with ``Expect: 100-continue`` and streamed only if
    the server answers 100 (a server that refuses it on its length never receives it)."""
    u = urllib.parse.urlsplit(url)
    if isinstance(body, StreamedBody):
        with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock, sock.makefile("rb") as f:
            sock.sendall((f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {body.length}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
                         .encode())
            reply = _read_reply(f)
            if reply.status == 100:
                for chunk in body.chunks():
                    sock.sendall(chunk)
                reply = _read_reply(f)
            return reply
    own = conn is None
    c = conn or http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request("POST", u.path or "/", body=body, headers={"Content-Type": content_type})
        r = c.getresponse()
        return Reply(r.status, r.read().decode("utf-8", "replace"))
    finally:
        if own:
            c.close()


def _zero_image_json(h: int, w: int) -> StreamedBody:
    """``{"inputs": <h×w×3 zeros>}`` written row by row (never held whole)."""
    row = ("[" + "[0,0,0]," * (w - 1) + "[0,0,0]]").encode()
    head, tail = b'{"inputs":[', b"]}"

    def chunks() -> Iterator[bytes]:
        yield head
        for i in range(h):
            yield row if i == 0 else b"," + row
        yield tail

    return StreamedBody(len(head) + h * len(row) + (h - 1) + len(tail), chunks)


def wrong_requests(h: int = 48, w: int = 64, *, big_side: int = 7072) -> dict[str, bytes | StreamedBody]:
    """Requests the server must refuse (4xx, a message saying what is wrong), by name; small
    ones are ``h``×``w``. ``"50-megapixel image"`` is a ``big_side``² RGB image (7072² =
    50,013,184 pixels), streamed only if the server asks for it."""
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (h, w, 3))
    return {
        "float image in [0, 1]": request_body(np.round(good / 255.0, 4)),
        "not an image (text)": request_body("a photo of a car"),
        "not JSON": b'{"inputs": [[[1, 2, 3]',
        "JSON without 'inputs'": json.dumps({"image": good.tolist()}).encode(),
        "H×W, no channel axis": request_body(good[..., 0]),
        "5 channels": request_body(rng.integers(0, 256, (h, w, 5))),
        "wrong dtype (booleans)": request_body(good > 127),
        "values outside 0..255": request_body(good * 4 - 100),
        "empty input": request_body([]),
        "bad parameter (steps 0)": request_body(good, {"steps": 0}),
        "50-megapixel image": _zero_image_json(big_side, big_side),
    }


class ServerProcess:
    """``python -m magicfuse.serve`` in a child process (its own process group) on a free
    port, for scripts and tests::

        with ServerProcess("models:/magicfuse@champion", tracking_uri=uri) as server:
            post(server.url + "/invocations", request_body(image))

    Entering waits for ``/ping`` (at most ``startup_timeout`` s) and raises with the tail of
    the server's log if it exits or does not answer; leaving — also on errors — sends
    SIGTERM to the process group, then SIGKILL after ``stop_timeout`` s.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, tracking_uri: str | None = None, host: str = DEFAULT_HOST,
                 args: Sequence[str] = (), startup_timeout: float = 240.0, stop_timeout: float = 15.0,
                 log_path: str | Path | None = None, cwd: str | Path | None = None):
        self.model, self.tracking_uri, self.host, self.args = model, tracking_uri, host, list(args)
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="magicfuse-serve-")
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "server.log"
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self) -> "ServerProcess":
        port_file = Path(self._tmp.name) / "port"
        cmd = [sys.executable, "-m", "magicfuse.serve", "--model", self.model, "--host", self.host, "--port", "0",
               "--port-file", str(port_file), *self.args]
        if self.tracking_uri:
            cmd += ["--tracking-uri", self.tracking_uri]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.cwd)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the model server exited with status {self.proc.returncode} before answering; "
                                   f"its log ends:\n{self.log_tail()}")
            if port_file.is_file() and not self.url:
                self.url = f"http://{self.host}:{int(port_file.read_text())}"
            if self.url and self.ping(timeout=2.0):
                return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"the model server did not answer /ping within {self.startup_timeout:.0f} s; "
                                   f"its log ends:\n{self.log_tail()}")
            time.sleep(0.25)

    def ping(self, timeout: float = 5.0) -> bool:
        u = urllib.parse.urlsplit(self.url)
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        try:
            c.request("GET", "/ping")
            return c.getresponse().status == 200
        except OSError:
            return False
        finally:
            c.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._tmp.cleanup()

    def __enter__(self) -> "ServerProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
