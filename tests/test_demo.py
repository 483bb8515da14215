"""Tests of demo/demo.py with the shipped model on the CPU: the event stream against sample.py, the refused requests,
one run at a time, and the page itself in headless Chromium (skipped when Chromium is not installed).

    python -m pytest -q tests/test_demo.py

One server (`python demo/demo.py --port 0`) serves every test.
"""
import base64
import http.client
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
from data import fmnist_rgb32, from_uint8, load_fashion_mnist, open_image  # noqa: E402

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def server():
    """A running `python demo/demo.py --port 0` on the CPU: (host, port, its log lines so far)."""
    proc = subprocess.Popen([sys.executable, "demo/demo.py", "--port", "0", "--device", "cpu"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = proc.stdout.readline()  # "D-AR demo on cpu: open http://127.0.0.1:PORT/ ..."
    if "http://" not in line:
        proc.kill()
        pytest.fail(f"demo/demo.py did not start: {line}{proc.stderr.read()}")
    host, port = line.split("http://")[1].split("/")[0].split(":")
    log = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    yield host, int(port), log
    proc.terminate()
    proc.wait(10)


def post(server, body, raw=None):
    """POST /generate → the open response (read it, or iterate `events` over it)."""
    conn = http.client.HTTPConnection(*server[:2], timeout=60)
    conn.request("POST", "/generate", body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn.getresponse()


def events(response):
    """The server-sent events of a response as (event, data) pairs, as they arrive."""
    event = None
    for line in response:
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: "):])


def pixels(url):
    """A PNG data URL → (H, W, 3) uint8."""
    return np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def png_base64(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


RUN = dict(classes=["Coat", "Bag"], samples=2, cfg="1.5,4", temperature=0.9, seed=3)


def test_stream_arrives_in_order_and_equals_sample_py(server, models, tmp_path):
    response = post(server, RUN)
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    got = list(events(response))
    start = got[0][1]
    N, M, K = start["num_tokens"], start["group_size"], start["num_groups"]
    assert (N, M, K, start["num_steps"]) == (64, 8, 8, 8) and start["labels"] == [4, 8]
    # every token in order, each step's preview right after the last token of its group, then the end
    expected = ["start"] + [e for i in range(N) for e in ["token"] + ["preview"] * ((i + 1) % M == 0)] + ["done"]
    assert [e for e, _ in got] == expected
    assert [d["index"] for e, d in got if e == "token"] == list(range(N))
    assert [d["step"] for e, d in got if e == "preview"] == list(range(1, K + 1))
    tokens = torch.tensor([d["codes"] for e, d in got if e == "token"]).T  # (B, N)
    previews = np.stack([[pixels(u) for u in d["images"]] for e, d in got if e == "preview"], 1)  # (B, K, H, W, 3)
    gif = Image.open(io.BytesIO(base64.b64decode(got[-1][1]["gif"].split(",", 1)[1])))
    assert gif.format == "GIF" and gif.n_frames == K

    # sample.py with the same labels, seed and settings
    tok, gpt = models
    step = sample.DecodeStep(gpt, 2, "1.5,4", temperature=0.9, generator=torch.Generator().manual_seed(3))
    ref_tokens, _, image, ref_previews = sample.sample_batch(gpt, tok, torch.tensor([4, 8]), step)
    assert torch.equal(tokens, ref_tokens)
    assert np.array_equal(previews, ref_previews.numpy())
    assert np.array_equal(previews[:, -1], sample.to_uint8(image).numpy())  # the last preview is the image
    assert previews[:, 0].std() != previews[:, -1].std()

    # sample.py --gif draws the same animation as the page's "save GIF"
    gif_path = tmp_path / "run.gif"
    sample.main(sample.parse_args(["--labels", "4", "8", "--seed", "3", "--cfg-scale", "1.5,4", "--temperature", "0.9",
                                   "--device", "cpu", "--out", "", "--gif", str(gif_path)]))
    assert gif_path.read_bytes() == base64.b64decode(got[-1][1]["gif"].split(",", 1)[1])


@pytest.mark.parametrize("argv, message", [(["--gif", "run.png"], "--gif run.png: the file name must end in .gif"),
                                           (["--gif", "run.gif", "--no-previews"], "cannot go with --no-previews")])
def test_sample_py_refuses_a_bad_gif_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def models():
    return sample.load_models(str(ROOT / "checkpoints/tokenizer_fmnist.pt"), str(ROOT / "checkpoints/gpt_fmnist.pt"),
                              None, torch.float32, torch.device("cpu"))


def gallery_image():
    """The gallery's first image: Fashion-MNIST's first T-shirt of the test split (28, 28) uint8."""
    try:
        images, labels = load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return images[np.flatnonzero(labels == 0)[0]]


@pytest.mark.parametrize("source", ["gallery", "upload"])
def test_layout_control_equals_sample_py_with_a_prefix_image(server, models, source, tmp_path):
    Image.fromarray(gallery_image()).save(tmp_path / "ref.png")
    ref = {"gallery": 0} if source == "gallery" else {"upload": base64.b64encode((tmp_path / "ref.png").read_bytes())
                                                      .decode()}
    got = list(events(post(server, dict(RUN, reference=ref, keep_groups=2))))
    assert got[0][1]["prefix"] == 16 and got[-1][0] == "done"
    tokens = torch.tensor([d["codes"] for e, d in got if e == "token"]).T  # (B, N)
    final = np.stack([pixels(u) for u in got[-2][1]["images"]])  # the last preview
    # sample.py --prefix-image ref.png --prefix-tokens 16 --labels 4 8 --seed 3 --cfg-scale 1.5,4 --temperature 0.9
    tok, gpt = models
    prefix = sample.prefix_codes(tok, open_image(tmp_path / "ref.png"), 16, torch.device("cpu"))  # (1, 16)
    step = sample.DecodeStep(gpt, 2, "1.5,4", temperature=0.9, generator=torch.Generator().manual_seed(3))
    ref_tokens, _, image, _ = sample.sample_batch(gpt, tok, torch.tensor([4, 8]), step, prefix=prefix)
    assert torch.equal(tokens, ref_tokens) and np.array_equal(final, sample.to_uint8(image).numpy())
    codes = tok.encode(from_uint8(fmnist_rgb32(gallery_image()[None])))  # (1, N): the padded training format
    assert torch.equal(tokens[:, :16], codes[:, :16].expand(2, -1))
    assert not torch.equal(tokens[:, 16:], codes[:, 16:].expand(2, -1))


BAD = [  # request, status, what the message says
    (dict(RUN, classes=["Hat"]), 400, "unknown class 'Hat'"),
    (dict(RUN, classes=[]), 400, "choose at least one class"),
    (dict(RUN, samples=17), 400, "at most 16"),
    (dict(RUN, samples="two"), 400, "samples: 'two' is not a number"),
    (dict(RUN, temperature="warm"), 400, "temperature: 'warm' is not a number"),
    (dict(RUN, temperature=0), 400, "temperature: '0' must be a finite number > 0"),
    (dict(RUN, seed=-1), 400, "seed: '-1' must be a whole number"),
    (dict(RUN, cfg="1,2,3"), 400, "cfg: '1,2,3': give 'a' or 'a,b' with finite scales ≥ 1"),
    (dict(RUN, cfg="0.5"), 400, "cfg: '0.5': give 'a' or 'a,b' with finite scales ≥ 1"),
    (dict(RUN, cfg="4,x"), 400, "cfg: '4,x' is not 'a' or 'a,b' with numbers"),
    (dict(RUN, reference={"upload": base64.b64encode(b"GIF89a not really").decode()}, keep_groups=2), 400,
     "the uploaded file: not a readable image"),
    (dict(RUN, reference={"upload": "***"}, keep_groups=2), 400, "not base64"),
    (dict(RUN, reference={"gallery": 0}, keep_groups=8), 400, "keep_groups: at most 7 of the 8 groups"),
    (dict(RUN, reference={"gallery": 999}, keep_groups=2), 400, "reference: the gallery has"),
    (dict(RUN, reference={"upload": base64.b64encode(os.urandom(3 << 20)).decode()}, keep_groups=2), 413,
     "at most 2097152"),
    ("[1, 2", 400, "not JSON"),
    ("[" * 100000 + "]" * 100000, 400, "not JSON"),  # nested past Python's recursion limit
    ('{"classes": ["Coat"], "samples": 1, "cfg": "4", "temperature": NaN, "seed": 0}', 400,
     "temperature: 'nan' must be a finite number > 0"),
    ('{"classes": ["Coat"], "samples": 1, "cfg": "4", "temperature": 1e999, "seed": 0}', 400,
     "temperature: 'inf' must be a finite number > 0"),
    (dict(RUN, samples=10 ** 100), 400, "at most 16"),
    (dict(RUN, samples=[1]), 400, "samples: '[1]' is not a number"),
    (dict(RUN, samples=1.5), 400, "samples: '1.5' is not a number"),
    (dict(RUN, samples=-3), 400, "samples: '-3' must be a whole number ≥ 1"),
    (dict(RUN, seed=2 ** 64), 400, "seed: '18446744073709551616' must be a whole number in [0, 2^63)"),
    (dict(RUN, cfg="1e300"), 400, "with finite scales ≥ 1 and ≤ 100"),
    (dict(RUN, classes="Coat"), 400, "classes: choose at least one class"),
    (dict(RUN, classes=[{"x": 1}]), 400, "unknown class {'x': 1}"),
    (dict(RUN, classes=["x" * 10 ** 6]), 400, "unknown class 'xxxxx"),
    (dict(RUN, run="rm -rf /"), 400, "unknown field 'run'"),
    ([RUN], 400, "the request must be a JSON object"),
    (dict(RUN, reference={"gallery": 0, "upload": "x"}, keep_groups=2), 400, "reference: expected"),
    (dict(RUN, reference={"gallery": 0}, keep_groups=-1), 400, "keep_groups: '-1' must be"),
]
for name, message in [("text", "cannot identify image file"), ("tiff", "cannot identify image file"),
                      ("half", "truncated"), ("bomb", "5000×5000 pixels is more than 16777216 allowed"),
                      ("strip", "1×3000 pixels: the aspect ratio is over 32:1")]:
    if name == "text":
        raw = b"<script>alert(1)</script>"
    else:
        buf = io.BytesIO()
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        image = {"bomb": Image.new("1", (5000, 5000)), "strip": Image.new("L", (1, 3000))}.get(name, noise)
        image.save(buf, format="TIFF" if name == "tiff" else "PNG")
        raw = buf.getvalue()[:len(buf.getvalue()) // 2] if name == "half" else buf.getvalue()
    BAD.append((dict(RUN, reference={"upload": base64.b64encode(raw).decode()}, keep_groups=2), 400,
                f"the uploaded file: not a readable image ({message}" if name != "half" else message))


@pytest.mark.parametrize("body, status, message", BAD, ids=[m.split(":")[0][:24] for _, _, m in BAD])
def test_bad_requests_get_a_clear_4xx(server, body, status, message):
    response = post(server, body, raw=body if isinstance(body, str) else None)
    assert response.status == status
    assert message in json.loads(response.read())["error"]


def raw_request(server, data):
    """Bytes sent as they are over a fresh connection, then its end → the status and the error of the answer."""
    with socket.create_connection(server[:2], timeout=60) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: sock.recv(1 << 16), b""))
    head, body = answer.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"GET / HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n", 403, "Host 'evil.example:8000' is not this server"),
    (b"GET /config HTTP/1.1\r\n\r\n", 403, "Host '' is not this server"),
    (b"GET /../../etc/passwd HTTP/1.1\r\nHost: {host}\r\n\r\n", 404, "no page /../../etc/passwd"),
    (b"GET /demo.py HTTP/1.1\r\nHost: {host}\r\n\r\n", 404, "no page /demo.py"),
    (b"PUT /generate HTTP/1.1\r\nHost: {host}\r\n\r\n", 405, "PUT is not served here"),
    (b"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length -5"),
    (b"POST /generate HTTP/1.1\r\nHost: {host}\r\n\r\n", 411, "needs a Content-Length"),
    (b"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Length: 50\r\n\r\n{", 400, "ended after 1 of its 50"),
])
def test_foreign_hosts_paths_and_methods_get_a_clear_4xx(server, request_bytes, status, message):
    got, error = raw_request(server, request_bytes.replace(b"{host}", f"127.0.0.1:{server[1]}".encode()))
    assert got == status and message in error, (got, error)


def test_binds_to_localhost_by_default_and_a_slow_client_blocks_no_one(server):
    assert server[0] == "127.0.0.1"
    slow = socket.create_connection(server[:2])  # sends half a request, then nothing (its thread waits for it)
    slow.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{server[1]}\r\nContent-Length: 500\r\n\r\n{{".encode())
    try:
        start = time.time()
        conn = http.client.HTTPConnection(*server[:2], timeout=10)
        conn.request("GET", "/config")
        assert conn.getresponse().status == 200 and time.time() - start < 5
        assert list(events(post(server, dict(RUN, samples=1))))[-1][0] == "done"
    finally:
        slow.close()


def test_many_concurrent_generations_run_one_at_a_time_or_are_told_busy(server):
    def one(results):
        response = post(server, dict(RUN, samples=1))
        results.append(list(events(response))[-1][0] if response.status == 200 else
                       (response.status, json.loads(response.read())["error"]))
    results = []
    threads = [threading.Thread(target=one, args=(results,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    busy = (409, "busy: another run is in progress; try again when it has finished")
    assert len(results) == 8 and set(results) <= {"done", busy} and "done" in results, results
    assert not any("Traceback" in line for line in server[2]), "".join(server[2])  # none crashed


def test_one_run_at_a_time_and_a_client_that_leaves_stops_its_run(server):
    response = post(server, dict(RUN, samples=16))
    stream = events(response)
    assert next(stream)[0] == "start" and next(stream)[0] == "token"
    busy = post(server, RUN)
    assert busy.status == 409 and "busy" in json.loads(busy.read())["error"]
    response.close()  # the browser goes away
    deadline = time.time() + 60
    while (response := post(server, dict(RUN, samples=1))).status == 409:  # until the first run has stopped
        response.read()
        assert time.time() < deadline
        time.sleep(0.1)
    assert list(events(response))[-1][0] == "done"
    log = server[2]
    assert any("stopped: the client went away" in line for line in log), log
    assert not any("run of 16 sample(s) done" in line for line in log)


# ---------------------------------------------------------------------------------------------------------------
# the page, in headless Chromium

class DevTools:
    """Headless Chromium driven through its DevTools protocol over a pipe (--remote-debugging-pipe): JSON messages
    ending in a NUL byte, commands written to the browser's file descriptor 3, answers and events read from its 4."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1280,900", "--remote-debugging-pipe"]

    def __init__(self, profile):
        commands, self.commands = os.pipe()
        self.answers, answers = os.pipe()
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{commands} 4>&{answers}', CHROMIUM,
                                      *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     pass_fds=(commands, answers), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(answers)
        self.buffer, self.id, self.session = b"", 0, None

    def send(self, method, **params):
        self.id += 1
        message = dict(id=self.id, method=method, params=params)
        if self.session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:  # events are skipped
            answer = self.read()
            if answer.get("id") == self.id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]

    def read(self, timeout=30):
        while b"\0" not in self.buffer:
            assert select.select([self.answers], [], [], timeout)[0], "Chromium does not answer"
            chunk = os.read(self.answers, 1 << 20)
            assert chunk, "Chromium exited"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url):
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression, timeout=60):
        deadline = time.time() + timeout
        while not self.js(expression):
            assert time.time() < deadline, f"timed out waiting for {expression}: " + \
                self.js("document.body.dataset.state + ': ' + $('message').textContent")
            time.sleep(0.1)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        os.close(self.commands)
        os.close(self.answers)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_page_shows_every_preview_in_headless_chromium(server, tmp_path):
    browser = DevTools(tmp_path / "profile")
    try:
        browser.open(f"http://{server[0]}:{server[1]}/")
        browser.wait("document.body.dataset.state === 'ready'")
        if not browser.js("document.querySelectorAll('#gallery img').length"):
            pytest.skip(browser.js("$('gallery-note').textContent"))  # the layout control needs a reference
        # a refused request: its message on the page
        browser.js("$('samples').value = 99; $('generate').click()")
        browser.wait("document.body.dataset.state === 'error'")
        assert "at most 16" in browser.js("$('message').textContent")
        # a run: Trouser, Coat and Sneaker are ticked by default
        browser.js("$('samples').value = 3; $('generate').click()")
        browser.wait("document.body.dataset.state !== 'running'")
        assert browser.js("[document.body.dataset.state, $('message').textContent]") == ["done", ""]
        assert browser.js("[...document.querySelectorAll('.card h2')].map(h => h.textContent)") == \
            ["Trouser", "Coat", "Sneaker"]
        assert browser.js("document.querySelectorAll('.tokens span:not(:empty)').length") == 3 * 64
        assert browser.js("[...document.querySelectorAll('.strip')].map(s => s.children.length)") == [8, 8, 8]
        assert browser.js("[...document.querySelectorAll('.card')].every(c => c.querySelector('.preview').src === "
                          "c.querySelector('.strip img:last-child').src)")  # the final image is shown
        assert "per sample" in browser.js("$('status').textContent")
        assert browser.js("!$('gif').disabled && gif.startsWith('data:image/gif;base64,')")
        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "demo.png").write_bytes(shot)
        assert Image.open(io.BytesIO(shot)).width == 1280
        # layout control: the gallery's first image, its first 2 groups kept
        browser.js("document.querySelector('#gallery img').click(); $('generate').click()")
        browser.wait("document.body.dataset.state !== 'running'")
        assert browser.js("document.body.dataset.state") == "done"
        assert browser.js("document.querySelectorAll('.tokens span.kept').length") == 3 * 16
    finally:
        browser.close()


def test_speculative_window_longer_than_the_tokens_is_refused_in_one_line():
    out = subprocess.run([sys.executable, "demo/demo.py", "--port", "0", "--device", "cpu", "--speculative", "65"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "demo.py: error: --speculative 65: this model makes 64 tokens, a longer window is never filled"]
