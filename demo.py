"""Watch D-AR think: a local web page where tokens stream in and every finished group sharpens the image (paper Fig. 1).

    python demo.py                                   # the shipped Fashion-MNIST model at http://127.0.0.1:8000/
    python demo.py --host 0.0.0.0 --port 8080 --gpt-ckpt D-AR-L-360K.pt --gpt-model GPT-L \
        --tokenizer-ckpt D-AR-tokenizer_v1.pt        # any pair sample.py takes; --host opens it to the network

The page (demo.html, beside this file) posts one JSON request per run to /generate and reads the answer as
server-sent events, written while sample.py's streaming decoder computes them (paper §3.3):
    start    {labels, names, num_tokens, group_size, steps, prefix}  what is about to be generated
    token    {index, codes}            the code at position `index` (decoding order) of every sample
    preview  {step, groups, images}    after solver step `step` (1-based, conditioned on the first `groups` groups):
                                       each sample's jump estimate of the final image as a PNG data URL; the
                                       last one is the image, equal to sample.py's for the same seed and settings
    done     {seconds, gif}            the wall time and the run as an animated GIF (a data URL)
    error    {message}                 the run failed after it had started
A request the server refuses gets a 4xx with {"error": message}; one run at a time (409 while another runs); a
client that goes away stops its run at the next token.
"""
import base64
import binascii
import io
import json
import threading
import time
from argparse import ArgumentTypeError
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import sample
from data import (ArgumentParser, center_crop_arr, fmnist_rgb32, from_uint8, load_fashion_mnist, load_image,
                  nonnegative_float, nonnegative_int, positive_float, positive_int, setup_device)
from model import generate

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")  # the shipped model's 10 classes; a model with another count gets numbers
MAX_SAMPLES = 16  # per run: the page draws every sample's token grid, and a CPU takes ~1 s per sample
MAX_UPLOAD = 2 << 20  # bytes of an uploaded reference image
MAX_BODY = MAX_UPLOAD * 4 // 3 + (64 << 10)  # the image travels base64-encoded inside the JSON request
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


# ---------------------------------------------------------------------------------------------------------------
# sampling: the adapter to sample.py and the GIF

def sample_stream(tok, gpt, labels, cfg_scale, temperature, generator, prefix, on_token, on_preview):
    """sample.py's streaming sampler with callbacks: on_token(i, tokens (B, N)) after token i, then
    on_preview(step, image (B, H, W, 3) uint8) after each solver step it made possible. Returns the image."""
    R = tok.config.image_size
    noise = torch.randn(labels.shape[0], 3, R, R, generator=generator, device=labels.device)
    stream = sample.StreamingDecoder(tok, noise)

    def step(i, tokens):
        on_token(i, tokens)
        done = stream.steps_done
        stream(i, tokens)
        for s in range(done, stream.steps_done):
            on_preview(s, stream.previews[s])
    kw = {} if prefix is None else dict(prefix=prefix.expand(labels.shape[0], -1))
    generate(gpt, labels, cfg_scale=cfg_scale, temperature=temperature, generator=generator, on_token=step, **kw)
    return stream.finish()[0]


def previews_gif(previews, f, scale=4, ms=500, hold=4):
    """previews (B, S, H, W, 3) uint8 → an animated GIF written to the binary file f: frame s shows every sample's
    preview after step s in a row (upscaled `scale`× without smoothing); the final image stays `hold`× longer."""
    B, S = previews.shape[:2]
    frames = []
    for s in range(S):
        im = Image.fromarray(sample.grid(previews[:, s], min(B, 8)))
        frames.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=[ms] * (S - 1) + [ms * hold],
                   loop=0)


def png_url(image):
    """(H, W, 3) uint8 → a PNG data URL."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------------------------
# the server's state and the requests it accepts

class Demo:
    """The models, what the page may choose from, and the lock that lets one run at a time."""

    def __init__(self, tok, gpt, device):
        self.tok, self.gpt, self.device = tok, gpt, device
        n = gpt.config.num_classes
        self.names = list(FMNIST_CLASSES) if n == 10 else [str(c) for c in range(n)]
        self.steps = tok.config.num_denoising_steps
        self.gallery, self.gallery_labels, self.gallery_note = load_gallery()
        self.lock = threading.Lock()

    def config(self):
        """What the page needs to draw its controls (GET /config)."""
        c = self.tok.config
        return dict(names=self.names, num_tokens=c.num_tokens, group_size=c.queries_per_step,
                    num_groups=c.num_query_groups, steps=self.steps, max_samples=MAX_SAMPLES, max_upload=MAX_UPLOAD,
                    layout=not self.gpt.config.reverse_order, gallery_note=self.gallery_note,
                    gallery=[dict(image=png_url(im), name=self.names[c] if c < len(self.names) else str(c))
                             for im, c in zip(self.gallery, self.gallery_labels)])


def load_gallery():
    """The first GALLERY_PER_CLASS test images of each Fashion-MNIST class: (n, 32, 32, 3) uint8, labels, and a
    note for the page when the data set is not installed."""
    try:
        images, labels = load_fashion_mnist("test")
    except (FileNotFoundError, ValueError) as e:
        return np.zeros((0, 32, 32, 3), np.uint8), [], f"No gallery: {e}. Upload an image instead."
    idx = [i for c in range(10) for i in np.flatnonzero(labels == c)[:GALLERY_PER_CLASS]]
    return fmnist_rgb32(images[idx]), labels[idx].tolist(), ""


def field(req, name, parse):
    """req[name] through one of data.py's argparse number types; a BadRequest names the field."""
    if name not in req:
        raise BadRequest(f"{name}: missing")
    try:
        return parse(str(req[name]))
    except ArgumentTypeError as e:
        raise BadRequest(f"{name}: {e}") from None


def parse_run(req, demo):
    """The JSON body of POST /generate → the run's settings; raises BadRequest naming what is wrong.

    {"classes": [names], "samples": n, "cfg": "a" or "a,b", "temperature": t, "seed": s,
     optional "reference": {"gallery": i} or {"upload": base64 PNG/JPEG}, with "keep_groups": g}"""
    if not isinstance(req, dict):
        raise BadRequest("the request must be a JSON object")
    classes = req.get("classes")
    if not isinstance(classes, list) or not classes:
        raise BadRequest("classes: choose at least one class")
    unknown = [c for c in classes if c not in demo.names]
    if unknown:
        choices = ", ".join(demo.names) if len(demo.names) <= 20 else f"0 .. {len(demo.names) - 1}"
        raise BadRequest(f"unknown class {unknown[0]!r}: choose from {choices}")
    n = field(req, "samples", positive_int)
    if n > MAX_SAMPLES:
        raise BadRequest(f"samples: at most {MAX_SAMPLES} per run, got {n}")
    labels = [demo.names.index(c) for c in classes] * n  # the classes in turn, as sample.py --labels
    return dict(labels=labels[:n], cfg=parse_cfg(req.get("cfg", "")), temperature=field(req, "temperature", positive_float),
                seed=field(req, "seed", nonnegative_int), **parse_reference(req, demo))


def parse_cfg(text):
    """'a' (a constant guidance scale) or 'a,b' (a linear ramp over the tokens) → the same, as model.generate reads it."""
    scales = str(text).split(",")
    if len(scales) > 2:
        raise BadRequest(f"cfg: a scale 'a' or a ramp 'a,b', got {text!r}")
    try:
        return ",".join(str(nonnegative_float(a.strip())) for a in scales)
    except ArgumentTypeError as e:
        raise BadRequest(f"cfg: {e}") from None


def parse_reference(req, demo):
    """The layout reference: its image (3, R, R) in [-1, 1] and how many leading tokens to keep, or None and 0."""
    ref = req.get("reference")
    if ref is None:
        return dict(reference=None, keep=0)
    if not isinstance(ref, dict) or len(ref) != 1 or not {"gallery", "upload"} & ref.keys():
        raise BadRequest('reference: expected {"gallery": index} or {"upload": base64 image}')
    if demo.gpt.config.reverse_order:
        raise BadRequest("this AR model generates fine-to-coarse (reverse_order): it cannot keep a layout")
    K, R = demo.tok.config.num_query_groups, demo.tok.config.image_size
    keep = field(req, "keep_groups", positive_int)
    if keep >= K:
        raise BadRequest(f"keep_groups: at most {K - 1} of the {K} groups, got {keep}")
    if "gallery" in ref:
        i = field(ref, "gallery", nonnegative_int)
        if i >= len(demo.gallery):
            raise BadRequest(f"reference: the gallery has {len(demo.gallery)} images, got index {i}")
        image = from_uint8(center_crop_arr(Image.fromarray(demo.gallery[i]), R)[None])[0]
    else:
        try:
            raw = base64.b64decode(str(ref["upload"]), validate=True)
        except binascii.Error:
            raise BadRequest("reference: the upload is not base64-encoded") from None
        if len(raw) > MAX_UPLOAD:
            raise BadRequest(f"the uploaded file has {len(raw)} bytes; at most {MAX_UPLOAD} are allowed", 413)
        try:
            image = load_image(Upload(raw), R)
        except ValueError as e:
            raise BadRequest(f"{e}; upload a PNG or JPEG") from None
    return dict(reference=image, keep=keep * demo.tok.config.queries_per_step)


# ---------------------------------------------------------------------------------------------------------------
# one run, streamed

def stream_run(demo, run, send):
    """Generates the run's samples, calling send(event, data) for every token and preview as it is computed."""
    tok, gpt, device = demo.tok, demo.gpt, demo.device
    labels = torch.tensor(run["labels"], device=device)
    prefix = None
    if run["reference"] is not None:
        prefix = tok.encode(run["reference"][None].to(device))[:, :run["keep"]]  # (1, k)
    c = tok.config
    slices = tok.group_slices(demo.steps)
    send("start", dict(labels=run["labels"], names=[demo.names[i] for i in run["labels"]], num_tokens=c.num_tokens,
                       group_size=c.queries_per_step, steps=demo.steps, prefix=run["keep"]))
    previews = []

    def on_token(i, tokens):
        send("token", dict(index=i, codes=tokens[:, i].tolist()))

    def on_preview(s, image):
        previews.append(image.cpu().numpy())  # (B, H, W, 3) uint8
        send("preview", dict(step=s + 1, groups=slices[s].stop // c.queries_per_step,
                             images=[png_url(im) for im in previews[-1]]))
    t0 = time.perf_counter()
    generator = torch.Generator(device).manual_seed(run["seed"])
    sample_stream(tok, gpt, labels, run["cfg"], run["temperature"], generator, prefix, on_token, on_preview)
    seconds = time.perf_counter() - t0
    gif = io.BytesIO()
    previews_gif(np.stack(previews, 1), gif)
    send("done", dict(seconds=round(seconds, 3), gif="data:image/gif;base64," + base64.b64encode(gif.getvalue())
                      .decode()))
    return seconds


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /config, POST /generate (a run as server-sent events)."""
    server_version = "dar-demo"

    def do_GET(self):
        if self.path == "/":
            self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/config":
            self.reply(200, json.dumps(self.server.demo.config()).encode(), "application/json")
        else:
            self.fail(404, f"no page {self.path}: the demo is at /")

    def do_POST(self):
        if self.path != "/generate":
            return self.fail(404, f"no endpoint {self.path}: runs are posted to /generate")
        demo = self.server.demo
        try:
            run = parse_run(self.read_json(), demo)
        except BadRequest as e:
            return self.fail(e.status, str(e))
        if not demo.lock.acquire(blocking=False):
            return self.fail(409, "busy: another run is in progress; try again when it has finished")
        try:
            self.stream(demo, run)
        finally:
            demo.lock.release()

    def read_json(self):
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("the request needs a Content-Length", 411) from None
        if size > MAX_BODY:
            self.discard(size)
            raise BadRequest(f"the request has {size} bytes; an uploaded image may have at most {MAX_UPLOAD}", 413)
        try:
            return json.loads(self.rfile.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"the request is not JSON ({e})") from None

    def discard(self, size):
        """Reads a refused body (up to a limit), so that the client, still sending, gets the answer."""
        left = size if size <= 16 * MAX_BODY else 0
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)
        self.close_connection = True

    def stream(self, demo, run):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(event, data):
            try:
                self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                raise ClientGone(event) from None
        try:
            seconds = stream_run(demo, run, send)
            self.log_message("%d samples in %.2f s", len(run["labels"]), seconds)
        except ClientGone as e:
            self.log_message("stopped: the client went away (at a %s event)", e)
        except Exception as e:  # a genuine bug: the page shows it, the server keeps serving, the log has the trace
            self.log_error("run failed: %r", e)
            send("error", dict(message=f"the run failed: {e!r}"))
            raise

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def fail(self, status, message):
        self.reply(status, json.dumps(dict(error=message)).encode(), "application/json")


# ---------------------------------------------------------------------------------------------------------------

def load(tokenizer_ckpt, gpt_ckpt, gpt_model, device):
    args = SimpleNamespace(tokenizer_ckpt=tokenizer_ckpt, gpt_ckpt=gpt_ckpt, gpt_model=gpt_model, precision="auto")
    return sample.load_models(args, device)


def main(args):
    try:
        _, _, device = setup_device(args.device)
        server = ThreadingHTTPServer((args.host, args.port), Handler)  # a taken port fails now, not after loading
    except (ValueError, OSError) as e:
        raise SystemExit(f"demo.py: error: {e}") from None
    server.daemon_threads = True
    tok, gpt = load(args.tokenizer_ckpt, args.gpt_ckpt, args.gpt_model, device)
    server.demo = Demo(tok, gpt, device)
    host, port = server.server_address[:2]
    print(f"D-AR demo on {device}: open http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--tokenizer-ckpt", default="checkpoints/tokenizer_fmnist.pt", help="our or official tokenizer file")
    p.add_argument("--gpt-ckpt", default="checkpoints/gpt_fmnist.pt", help="our or official AR model file")
    p.add_argument("--gpt-model", default=None, help="GPT preset (GPT-L, GPT-XL): needed for official GPT files")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
