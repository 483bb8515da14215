"""Watch D-AR think: a local page where tokens stream in and each solver step sharpens the image (paper Figure 1).

    python demo/demo.py                              # the shipped Fashion-MNIST model at http://127.0.0.1:8000/
    python demo/demo.py --host 0.0.0.0 --port 8080 --gpt-ckpt D-AR-L-360K.pt --gpt-model GPT-L \
        --tokenizer-ckpt D-AR-tokenizer_v1.pt        # any pair sample.py takes; --host opens it to the network

The page (demo.html) posts a run as JSON to /generate and reads server-sent events, each sent as soon as sample.py's
loop has computed it (paper §3.3):
    start    {labels, names, num_tokens, group_size, num_groups, num_steps, prefix}
    token    {index, codes}     every sample's code at position `index` (generation order)
    preview  {step, images}     after solver step `step` (1-based), each sample's jump estimate as a PNG data URL;
                                the last is the image, equal to sample.py's for the same labels, seed and settings
    done     {seconds, gif}     the wall time and the run as an animated GIF (sample.py --gif draws the same)
    error    {message}          the run failed after it had started
Every field of a request is checked before its answer starts; a refused request gets a 4xx with {"error": message}
(409: another run is in progress; 403: a Host that is not this server's, as a page re-pointed at 127.0.0.1 by DNS
rebinding sends). A client that goes away, or stops reading for TIMEOUT seconds, stops its run at the next token.
"""
import base64
import binascii
import io
import ipaddress
import json
import sys
import threading
import time
from argparse import ArgumentTypeError
from contextlib import closing, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules live one folder up

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import sample  # noqa: E402
from data import (CHECKPOINTS, FMNIST_CLASSES, ArgumentParser, fmnist_rgb32, load_fashion_mnist,  # noqa: E402
                  nonnegative_int, open_image, positive_float, positive_int, previews_gif, seed_int, setup_device,
                  to_uint8)
from model import cfg_schedule  # noqa: E402

MAX_SAMPLES = 16  # per run: the page draws every sample's token grid; a CPU takes 0.3-0.6 s per sample
MAX_UPLOAD = 2 << 20  # bytes of an uploaded reference image
MAX_BODY = MAX_UPLOAD * 4 // 3 + (64 << 10)  # the image travels base64-encoded inside the JSON request
MAX_UPLOAD_PIXELS = 4096 * 4096  # of a decoded upload (a 2 MB PNG can hold a decompression bomb)
TIMEOUT = 30  # seconds a client may stay silent (sending its request) or not read (the events) before it is dropped
FIELDS = {"classes", "samples", "cfg", "temperature", "seed", "reference", "keep_groups"}
GALLERY_PER_CLASS = 2  # Fashion-MNIST test images offered as layout references
PAGE = Path(__file__).with_name("demo.html")


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status` and a message the page shows."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The browser closed the event stream: the run stops."""


class Upload(io.BytesIO):
    """The bytes of an uploaded image, named as such in data.open_image's errors."""

    def __str__(self):
        return "the uploaded file"


def png_url(image):
    """(H, W, 3) uint8 → a PNG data URL."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Demo:
    """The models, what the page may choose from, and the lock that lets one run at a time."""

    def __init__(self, tok, gpt, device, decoder_precision, speculative=0):
        self.tok, self.gpt, self.device, self.decoder_precision = tok, gpt, device, decoder_precision
        self.speculative = speculative  # sample.py --speculative: the window, 0 for one token per forward
        c = tok.config
        self.shape = dict(num_tokens=c.num_all_queries, group_size=c.queries_per_step, num_groups=c.num_query_groups,
                          num_steps=c.num_denoising_steps)
        n = gpt.config.num_classes
        self.names = list(FMNIST_CLASSES) if n == len(FMNIST_CLASSES) else [str(c) for c in range(n)]  # or numbers
        try:  # the first GALLERY_PER_CLASS test images of each class: layout references to click
            images, labels = load_fashion_mnist("test")
            idx = [i for c in range(len(FMNIST_CLASSES)) for i in np.flatnonzero(labels == c)[:GALLERY_PER_CLASS]]
            self.gallery, self.gallery_labels, self.gallery_note = images[idx], labels[idx].tolist(), ""  # (n, 28, 28)
        except (FileNotFoundError, ValueError) as e:
            self.gallery, self.gallery_labels = np.zeros((0, 28, 28), np.uint8), []
            self.gallery_note = f"No gallery: {e}. Upload an image instead."
        self.generator = torch.Generator(device)  # one for every run: CUDA graphs are captured with it
        self.steps = {}  # the AR decode step of the last (batch, cfg, temperature)
        self.lock = threading.Lock()

    def decode_step(self, batch, cfg, temperature):
        """sample.decode_step for the run (its CUDA graph on a GPU), made again when the batch or settings change."""
        key = (batch, cfg, temperature)
        if key not in self.steps:  # one at a time: each holds KV caches (and a graph) for its batch size
            self.steps = {key: sample.decode_step(self.gpt, batch, cfg, self.speculative, temperature=temperature,
                                                  generator=self.generator)}
        return self.steps[key]

    def config(self):
        """What the page needs to draw its controls (GET /config)."""
        return dict(self.shape, names=self.names, max_samples=MAX_SAMPLES, gallery_note=self.gallery_note,
                    layout=not self.gpt.config.reverse_order,
                    gallery=[dict(image=png_url(im), name=FMNIST_CLASSES[c])
                             for im, c in zip(fmnist_rgb32(self.gallery), self.gallery_labels)])


def field(req, name, parse, at_most=None, of=""):
    """req[name] through one of data.py's argparse types, at most `at_most`; a BadRequest names the field."""
    if name not in req:
        raise BadRequest(f"{name}: missing")
    try:
        value = parse(str(req[name]))
    except ArgumentTypeError as e:
        raise BadRequest(f"{name}: {str(e)[:200]}") from None
    if at_most is not None and value > at_most:
        raise BadRequest(f"{name}: at most {at_most}{of}, got {value}")
    return value


def parse_run(req, demo):
    """The JSON body of POST /generate → the run's settings; raises BadRequest naming what is wrong.

    {"classes": [names], "samples": n, "cfg": "a" or "a,b", "temperature": t, "seed": s,
     optional "reference": {"gallery": i} or {"upload": base64 PNG/JPEG}, with "keep_groups": g}"""
    if not isinstance(req, dict):
        raise BadRequest("the request must be a JSON object")
    unknown = sorted(set(req) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:40]!r}: a run takes {', '.join(sorted(FIELDS))}")
    classes = req.get("classes")
    if not isinstance(classes, list) or not classes:
        raise BadRequest("classes: choose at least one class")
    unknown = [c for c in classes if c not in demo.names]
    if unknown:
        choices = ", ".join(demo.names) if len(demo.names) <= 20 else f"0 .. {len(demo.names) - 1}"
        raise BadRequest(f"unknown class {repr(unknown[0])[:40]}: choose from {choices}")
    n = field(req, "samples", positive_int, MAX_SAMPLES, " per run")
    labels = [demo.names.index(c) for c in classes] * n  # the classes in turn, as sample.py --labels
    cfg = field(req, "cfg", sample.cfg_scale_arg)  # 'a' or a ramp 'a,b'
    if cfg_schedule(cfg, demo.gpt.config.block_size) is not None and not demo.gpt.config.null_class:
        raise BadRequest(f"cfg: this AR model has no null class, so it cannot use guidance (use 1), got {cfg}")
    return dict(labels=labels[:n], cfg=cfg, temperature=field(req, "temperature", positive_float),
                seed=field(req, "seed", seed_int), **parse_reference(req, demo))


def parse_reference(req, demo):
    """The layout reference as a PIL image and how many leading tokens to keep, or None and 0."""
    ref = req.get("reference")
    if ref is None:
        return dict(reference=None, keep=0)
    if not isinstance(ref, dict) or len(ref) != 1 or not {"gallery", "upload"} & ref.keys():
        raise BadRequest('reference: expected {"gallery": index} or {"upload": base64 image}')
    if demo.gpt.config.reverse_order:
        raise BadRequest("this AR model generates fine-to-coarse (reverse_order): it cannot keep a layout")
    K = demo.tok.config.num_query_groups
    keep = field(req, "keep_groups", positive_int, K - 1, f" of the {K} groups")
    if "gallery" in ref:
        i = field(ref, "gallery", nonnegative_int)
        if i >= len(demo.gallery):
            raise BadRequest(f"reference: the gallery has {len(demo.gallery)} images, got index {i}")
        image = Image.fromarray(demo.gallery[i]).convert("RGB")  # 28×28: sample.py pads it as in training
    else:
        try:
            raw = base64.b64decode(str(ref["upload"]), validate=True)
        except binascii.Error:
            raise BadRequest("reference: the upload is not base64-encoded") from None
        if len(raw) > MAX_UPLOAD:
            raise BadRequest(f"the uploaded file has {len(raw)} bytes; at most {MAX_UPLOAD} are allowed", 413)
        try:
            image = open_image(Upload(raw), MAX_UPLOAD_PIXELS)
        except ValueError as e:
            raise BadRequest(f"{e}; upload a PNG or JPEG") from None
    return dict(reference=image, keep=keep * demo.tok.config.queries_per_step)


def stream_run(demo, run, send):
    """Runs sample.py's loop for the run's samples, calling send(event, data) for every token and every preview as
    soon as it is computed; returns the seconds taken."""
    tok, device, R = demo.tok, demo.device, demo.tok.config.sampling_resolution
    labels = torch.tensor(run["labels"], device=device)
    prefix = None if run["reference"] is None else sample.prefix_codes(tok, run["reference"], run["keep"], device)
    send("start", dict(demo.shape, labels=run["labels"], names=[demo.names[i] for i in run["labels"]],
                       prefix=run["keep"]))
    t0 = time.perf_counter()
    demo.generator.manual_seed(run["seed"])  # as sample.py seeds its first batch, whose noise it draws first
    noise = torch.randn(len(labels), 3, R, R, generator=demo.generator, device=device)  # x0
    step = demo.decode_step(len(labels), run["cfg"], run["temperature"])
    previews = []
    loop = sample.stream(demo.gpt, tok, labels, noise, step, prefix=prefix, decoder_precision=demo.decoder_precision)
    with closing(loop):  # closed if the client goes
        for kind, i, out in loop:
            if kind == "token":
                send("token", dict(index=i, codes=out[:, i].tolist()))
            else:
                previews.append(to_uint8(out).cpu().numpy())  # (B, H, W, 3)
                send("preview", dict(step=i + 1, images=[png_url(im) for im in previews[-1]]))
    seconds = time.perf_counter() - t0
    gif = io.BytesIO()
    previews_gif(np.stack(previews, 1), gif)  # the picture of sample.py --gif
    send("done", dict(seconds=round(seconds, 3), gif="data:image/gif;base64," + base64.b64encode(gif.getvalue())
                      .decode()))
    return seconds


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /config, POST /generate (a run as server-sent events). Each connection has its own thread
    and TIMEOUT: a slow or silent client holds up no one else."""
    server_version = "dar-demo"
    timeout = TIMEOUT

    def parse_request(self):
        """After the request line and headers: only GET and POST, and only with this server's name in Host."""
        if not super().parse_request():
            return False
        if self.command not in ("GET", "POST"):
            self.fail(405, f"{self.command[:20]} is not served here: GET / or POST /generate")
            return False
        host, port = self.server.server_address[:2]
        names = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        given = self.headers.get("Host", "")
        if ipaddress.ip_address(host).is_loopback and given not in names:
            # a page elsewhere whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name
            self.fail(403, f"Host {given[:60]!r} is not this server: open http://{host}:{port}/")
            return False
        return True

    def do_GET(self):
        if self.path == "/":
            self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/config":
            self.reply(200, json.dumps(self.server.demo.config()).encode(), "application/json")
        else:
            self.fail(404, f"no page {self.path[:100]}: the demo is at /")

    def do_POST(self):
        if self.path != "/generate":
            return self.fail(404, f"no endpoint {self.path[:100]}: runs are posted to /generate")
        demo = self.server.demo
        try:
            run = parse_run(self.read_json(), demo)
        except BadRequest as e:
            return self.fail(e.status, str(e))
        if not demo.lock.acquire(blocking=False):
            return self.fail(409, "busy: another run is in progress; try again when it has finished")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            seconds = stream_run(demo, run, self.send)
            self.log_message("run of %d sample(s) done in %.2f s", len(run["labels"]), seconds)
        except ClientGone as e:
            self.log_message("stopped: the client went away (at a %s event)", e)
        except Exception as e:  # a genuine bug: the page shows it, the server keeps serving, the log has the trace
            self.log_error("run failed: %r", e)
            self.send("error", dict(message=f"the run failed: {e!r}"))
            raise
        finally:
            demo.lock.release()

    def send(self, event, data):
        """One server-sent event; ClientGone when the browser has closed the stream."""
        try:
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        except OSError:  # closed, reset, or not read for TIMEOUT seconds
            raise ClientGone(event) from None

    def read_json(self):
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("the request needs a Content-Length", 411) from None
        if size < 0:
            raise BadRequest(f"Content-Length {size}: not a length")
        if size > MAX_BODY:  # read it all the same (up to a limit), so that the client, still sending, gets the answer
            left = size if size <= 16 * MAX_BODY else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            self.close_connection = True
            raise BadRequest(f"the request has {size} bytes; an uploaded image may have at most {MAX_UPLOAD}", 413)
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            raise BadRequest(f"the request body did not arrive within {TIMEOUT} s", 408) from None
        if len(body) < size:
            raise BadRequest(f"the request ended after {len(body)} of its {size} bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise BadRequest(f"the request is not JSON ({str(e)[:100]})") from None

    def reply(self, status, body, content_type):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client has gone (or stopped reading): no one to answer
            self.close_connection = True

    def fail(self, status, message):
        self.reply(status, json.dumps(dict(error=message)).encode(), "application/json")


def main(args):
    try:
        _, _, device = setup_device(args.device)
        server = ThreadingHTTPServer((args.host, args.port), Handler)  # a taken port fails now, not after loading
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as sample.py --precision auto
        tok, gpt = sample.load_models(args.tokenizer_ckpt, args.gpt_ckpt, args.gpt_model, dtype, device,
                                      args.decoder_precision)
        sample.check_window(args.speculative, gpt)
    except (ValueError, OSError) as e:
        raise SystemExit(f"demo.py: error: {str(e).splitlines()[0]}") from None
    server.demo = Demo(tok, gpt, device, args.decoder_precision, args.speculative)
    host, port = server.server_address[:2]
    print(f"D-AR demo on {device}: open http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    with server, suppress(KeyboardInterrupt):
        server.serve_forever()


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--tokenizer-ckpt", default=str(CHECKPOINTS / "tokenizer_fmnist.pt"),
                   help="our or official tokenizer file")
    p.add_argument("--gpt-ckpt", default=str(CHECKPOINTS / "gpt_fmnist.pt"), help="our or official AR model file")
    p.add_argument("--gpt-model", default=None, help="GPT preset (GPT-L, GPT-XL): needed for official GPT files")
    p.add_argument("--decoder-precision", choices=["tf32", "fp32", "bf16"], default="tf32",
                   help="pixel decoder precision, as sample.py's (on a CPU tf32 and fp32 are the same)")
    p.add_argument("--speculative", type=nonnegative_int, default=0, metavar="W",
                   help="speculative Jacobi decoding with a window of W tokens, as sample.py's (0: off)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = p.parse_args(argv)
    if args.port > 65535:
        p.error(f"argument --port: '{args.port}' must be a port number, 0..65535")
    return args


if __name__ == "__main__":
    main(parse_args())
