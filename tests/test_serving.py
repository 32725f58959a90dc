"""Serving the registered pipeline (`python -m magicfuse.serve`, what `make serve` runs): the
pyfunc's input check (fast, pure numpy) and the real server on a temporary store (slow):
good requests answer the in-process MagImg, wrong ones get 4xx naming the problem, and the
server keeps answering."""

from __future__ import annotations

import http.client
import types

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from magicfuse import tracking  # noqa: E402
from magicfuse.diffusion.settings import SamplerSettings  # noqa: E402
from magicfuse.errors import ConfigError, DataError  # noqa: E402
from magicfuse.inference import (PYFUNC_MAX_PIXELS, MagicFuse, _pyfunc_class, check_pyfunc_input,  # noqa: E402
                                 check_pyfunc_params)
from magicfuse.serve import ServerProcess, post, request_body, wrong_requests  # noqa: E402

from conftest import sqlite_store  # noqa: E402
from test_inference import save_tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 40, 56


def _rgb(h: int = H, w: int = W, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(dtype)


# ----------------------------------------------------------------------------- the check (fast)


def test_input_check_accepts_rgb_integers():
    img = _rgb()
    one = check_pyfunc_input(img)
    assert one.shape == (1, H, W, 3) and one.dtype == np.uint8
    np.testing.assert_array_equal(one[0], img)
    as_json = check_pyfunc_input(np.stack([img, img]).astype(np.int64))  # what MLflow parses JSON numbers to
    assert as_json.shape == (2, H, W, 3) and as_json.dtype == np.uint8
    np.testing.assert_array_equal(as_json[1], img)
    listed = check_pyfunc_input([img, _rgb(seed=1)])
    np.testing.assert_array_equal(listed[1], _rgb(seed=1))


FIFTY_MP = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (7072, 7072, 3))  # 50,013,184 pixels, no memory


@pytest.mark.parametrize("name, value, fragments", [
    ("float image in [0, 1]", _rgb() / 255.0, ["wrong dtype", "floats", "float64", "min 0", "integers 0..255"]),
    ("integral floats", _rgb().astype(np.float32), ["floats", "float32"]),
    ("text", np.array("a photo of a car"), ["not an image", "text"]),
    ("mixed values", np.array([[1, None]], dtype=object), ["not an image", "not all numbers"]),
    ("named inputs", {"image": _rgb()}, ["named inputs ['image']"]),
    ("nothing", None, ["got NoneType"]),
    ("H×W", _rgb()[..., 0], ["wrong shape (40, 56)", "no channel axis"]),
    ("5 channels", np.zeros((H, W, 5), np.uint8), ["wrong shape (40, 56, 5)", "5 channels, expected 3"]),
    ("grey channel", np.zeros((H, W, 1), np.uint8), ["1 channels, expected 3"]),
    ("5-D", np.zeros((1, 1, H, W, 3), np.uint8), ["5 dimensions"]),
    ("booleans", _rgb() > 127, ["wrong dtype", "booleans"]),
    ("above 255", _rgb(dtype=np.int64) + 1, ["out of range", "max 256"]),
    ("negative", _rgb(dtype=np.int64) - 1, ["out of range", "min -1"]),
    ("empty array", np.zeros((0,)), ["empty input", "(0,)"]),
    ("empty image", np.zeros((1, 0, 5, 3), np.uint8), ["empty input"]),
    ("empty list", [], ["empty input (no images)"]),
    ("sizes differ", [_rgb(), _rgb(20, 20)], ["share a size"]),
    ("list item H×W", [_rgb()[..., 0]], ["image 0: wrong shape"]),
    ("50 megapixels", FIFTY_MP, ["too large", "7072×7072 = 50,013,184 pixels", f"limit of {PYFUNC_MAX_PIXELS:,}"]),
])
def test_input_check_names_each_problem(name, value, fragments):
    with pytest.raises(DataError) as err:
        check_pyfunc_input(value)
    for fragment in fragments:
        assert fragment in str(err.value), (name, str(err.value))


def test_pixel_limit_counts_the_whole_request():
    batch = np.zeros((3, 8, 8, 3), np.uint8)
    assert check_pyfunc_input(batch, max_pixels=192).shape == (3, 8, 8, 3)
    with pytest.raises(DataError, match=r"3 image\(s\) of 8×8 = 192 pixels, more than the limit of 191"):
        check_pyfunc_input(batch, max_pixels=191)
    assert check_pyfunc_input(FIFTY_MP[:100, :100], max_pixels=None).shape == (1, 100, 100, 3)


def test_params_check():
    settings = SamplerSettings(steps=25, tau=0.4)
    assert check_pyfunc_params(None, settings) == {"seed": 0, "steps": 25, "tau": 0.4, "batch_size": 4}
    assert check_pyfunc_params({"seed": 3, "steps": 2, "tau": 0, "batch_size": 1}, settings) == \
        {"seed": 3, "steps": 2, "tau": 0.0, "batch_size": 1}
    for params, fragment in [({"steps": 0}, "steps must be an integer >= 1"), ({"steps": 5000}, "exceed"),
                             ({"steps": 2.5}, "'steps' must be an integer"), ({"tau": 1.5}, "tau"),
                             ({"tau": "x"}, "'tau' must be a number"), ({"batch_size": 0}, "'batch_size' must be >= 1"),
                             ({"stpes": 2}, "unknown parameter(s) ['stpes']")]:
        with pytest.raises(DataError) as err:
            check_pyfunc_params(params, settings)
        assert fragment in str(err.value), (params, str(err.value))


@pytest.fixture(scope="module")
def pipeline_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "pipeline.pt", steps=2)


def test_pyfunc_refusal_is_an_http_400_error(pipeline_path):
    """What the model server turns into its reply: an MLflow INVALID_PARAMETER_VALUE error
    (HTTP 400, the message kept) that Python callers can still catch as a DataError."""
    from mlflow.exceptions import MlflowException

    py = _pyfunc_class()()
    py.load_context(types.SimpleNamespace(artifacts={"pipeline": str(pipeline_path)},
                                          model_config={"device": "cpu", "max_pixels": 1000}))
    with pytest.raises(DataError) as err:
        py.predict(None, _rgb() / 255.0)
    assert isinstance(err.value, MlflowException) and err.value.get_http_status_code() == 400
    assert "floats" in err.value.message
    with pytest.raises(DataError, match="limit of 1,000 pixels"):  # the model config's limit
        py.predict(None, _rgb(32, 32))
    with pytest.raises(DataError, match="steps") as err:
        py.predict(None, _rgb(8, 8), params={"steps": 0})
    assert err.value.get_http_status_code() == 400
    out = py.predict(None, _rgb(8, 8).astype(np.int64), params={"steps": 1})  # JSON integers work
    np.testing.assert_array_equal(out, py.predict(None, _rgb(8, 8), params={"steps": 1}))
    py.configure(device="cpu", max_pixels=None)  # what magicfuse.serve sets after loading
    assert py.predict(None, _rgb(32, 32), params={"steps": 1}).shape == (1, 32, 32, 3)
    with pytest.raises(ConfigError, match="max_pixels"):
        py.configure(max_pixels=0)


# ----------------------------------------------------------------------------- the real server (slow)

SEED, STEPS = 7, 2
SERVER_MAX_PIXELS = 20_000  # so that a small request can cross the pixel limit


@pytest.fixture(scope="module")
def served(tmp_path_factory, pytestconfig, pipeline_path):
    """A tiny pipeline registered as magicfuse@champion in a fresh sqlite store, served by
    `python -m magicfuse.serve` on a free port of 127.0.0.1; always taken down."""
    root = tmp_path_factory.mktemp("serve")
    uri = sqlite_store(root, pytestconfig)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.delenv("MAGICFUSE_PIPELINE_RUN_ID", raising=False)
        tracking.configure()
        version = tracking.log_pipeline_model(pipeline_path, registered_name="magicfuse", example_hw=(32, 48))
        mlflow.MlflowClient().set_registered_model_alias("magicfuse", "champion", version.version)
    server = ServerProcess("models:/magicfuse@champion", tracking_uri=uri, cwd=root, startup_timeout=150,
                           args=["--device", "cpu", "--threads", "1", "--max-pixels", str(SERVER_MAX_PIXELS),
                                 "--max-body-mb", "8", "--timeout", "120", "--log-level", "warning"])
    try:
        server.start()
        yield server
    finally:
        server.stop()


EXPECTED = {  # wrong request -> (status, part of the message)
    "float image in [0, 1]": (400, "the image holds floats"),
    "not an image (text)": (400, "not an image: the input is text"),
    "not JSON": (400, "valid JSON"),
    "JSON without 'inputs'": (400, "exactly one of the input fields"),
    "H×W, no channel axis": (400, "no channel axis"),
    "5 channels": (400, "5 channels, expected 3"),
    "wrong dtype (booleans)": (400, "the image holds booleans"),
    "values outside 0..255": (400, "values out of range"),
    "empty input": (400, "empty input"),
    "bad parameter (steps 0)": (400, "steps must be an integer >= 1"),
    "50-megapixel image": (413, "request body of 400,119,628 bytes is larger than the limit"),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_server_answers_refuses_wrong_requests_and_keeps_answering(served, pipeline_path):
    url = served.url + "/invocations"
    img = _rgb(seed=3)
    good = request_body(img, {"seed": SEED, "steps": STEPS})

    reply = post(url, good, timeout=120)
    assert reply.status == 200, reply.text[:1000]
    out = np.asarray(reply.json()["predictions"])
    assert out.shape == (1, H, W, 3) and out.dtype.kind == "i" and out.min() >= 0 and out.max() <= 255
    ref = MagicFuse.from_pretrained(pipeline_path, device="cpu").fuse([img], seed=SEED, steps=STEPS,
                                                                       outputs=("magimg",))[0].magimg
    np.testing.assert_array_equal(out[0].astype(np.uint8), ref)  # the same bytes as in-process, same seed

    wrong = wrong_requests(H, W)
    assert set(wrong) == set(EXPECTED)
    replies = {name: post(url, body, timeout=60) for name, body in wrong.items()}
    for name, (status, fragment) in EXPECTED.items():
        r = replies[name]
        assert (r.status, fragment in r.message) == (status, True), f"{name}: {r.status} {r.message[:500]}"

    big = post(url, request_body(_rgb(150, 150)), timeout=60)  # 22,500 pixels: under the body limit, over the pixels
    assert big.status == 400 and f"more than the limit of {SERVER_MAX_PIXELS:,} pixels" in big.message, big.text[:500]

    conn = http.client.HTTPConnection("127.0.0.1", int(served.url.rsplit(":", 1)[1]), timeout=30)
    try:  # a chunked body has no length to check before reading it
        conn.request("POST", "/invocations", body=iter([good]), encode_chunked=True,
                     headers={"Content-Type": "application/json"})
        chunked = conn.getresponse()
        assert chunked.status == 411 and b"Content-Length" in chunked.read()
    finally:
        conn.close()

    again = post(url, good, timeout=120)  # still answering, and the same answer
    assert again.status == 200, again.text[:1000]
    np.testing.assert_array_equal(np.asarray(again.json()["predictions"]), out)
    assert served.ping()
