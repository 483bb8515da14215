"""FID-10k against training compute, D-AR beside plain diffusion (docs/results.md): the measured points of a JSON
file drawn as an SVG, one line per model and the real-vs-real floor dashed. No plotting package: GitHub shows the
SVG inline and it diffs as text.

    python experiments/plot_fid.py experiments/results/fid_vs_compute.json assets/fid_vs_compute.svg

The JSON: {"x": "training compute (PFLOP)", "y": "FID-10k", "floor": 2.38,
           "series": {"D-AR": [[17, 12.3], [34, 9.6], [68, 8.19]], "plain diffusion": [[17, 17.4], ...]}}
"""
import json
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import ArgumentParser, atomic_save, check_writable, exit_on_error  # noqa: E402

W, H, PAD = 520, 340, 56  # canvas and margin, in pixels
COLORS = ("#1f6fb4", "#d1432b", "#2b9a48", "#7b4fb0")


def ticks(top, n=5):
    """Round tick values 0, s, 2s, ... to the first at or above top, s a 1-2-5 step giving about n ticks."""
    decade = 10 ** math.floor(math.log10(top / n))
    step = next(m * decade for m in (1, 2, 5, 10) if m * decade >= top / n)
    return [i * step for i in range(math.ceil(top / step) + 1)]


def svg(figure):
    """The figure (the JSON's dict) as SVG text."""
    points = [p for s in figure["series"].values() for p in s] + [[0, figure.get("floor", 0)]]
    x_ticks, y_ticks = ticks(max(x for x, _ in points) or 1), ticks(max(y for _, y in points) or 1)
    x_top, y_top = x_ticks[-1] * 1.04, y_ticks[-1] * 1.04

    def at(x, y):  # data → pixels (y grows downwards)
        return PAD + x / x_top * (W - 1.5 * PAD), H - PAD - y / y_top * (H - 1.6 * PAD)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>']
    for v in x_ticks:
        x, y = at(v, 0)
        out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 4:.1f}" stroke="black"/>'
                   f'<text x="{x:.1f}" y="{y + 17:.1f}" text-anchor="middle">{v:g}</text>')
    for v in y_ticks:
        x, y = at(0, v)
        out.append(f'<line x1="{x - 4:.1f}" y1="{y:.1f}" x2="{W - PAD / 2:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{x - 7:.1f}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    (x0, y0), (x1, y1) = at(0, 0), at(x_top, y_top)
    out.append(f'<path d="M{x0:.1f},{y1:.1f} V{y0:.1f} H{x1:.1f}" fill="none" stroke="black"/>'
               f'<text x="{(x0 + x1) / 2:.1f}" y="{H - 12}" text-anchor="middle">{escape(figure["x"])}</text>'
               f'<text transform="translate(16,{(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{escape(figure["y"])}</text>')
    if "floor" in figure:
        _, y = at(0, figure["floor"])
        out.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="gray" stroke-dasharray="5,4"/>'
                   f'<text x="{x1 - 4:.1f}" y="{y - 5:.1f}" text-anchor="end" fill="gray">real vs real '
                   f'{figure["floor"]:g}</text>')
    for i, (name, series) in enumerate(figure["series"].items()):
        color, xy = COLORS[i % len(COLORS)], [at(x, y) for x, y in sorted(series)]
        out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}" fill="none" '
                   f'stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>' for x, y in xy]
        out.append(f'<text x="{W - 1.6 * PAD:.1f}" y="{PAD / 2 + 16 * i:.1f}" fill="{color}" text-anchor="end">'
                   f'{escape(name)}</text>')
    return "\n".join(out + ["</svg>", ""])


def read_figure(path):
    """The JSON's dict, checked: a ValueError names what is wrong."""
    figure = json.loads(Path(path).read_text())
    if not isinstance(figure, dict) or not {"x", "y", "series"} <= set(figure) or not figure["series"]:
        raise ValueError(f"{path}: needs keys x, y and a non-empty series")
    if not (isinstance(figure["x"], str) and isinstance(figure["y"], str) and isinstance(figure["series"], dict)):
        raise ValueError(f"{path}: x and y must be axis labels (strings), series a dict of name: points")
    if not isinstance(figure.get("floor", 0), (int, float)) or figure.get("floor", 0) < 0:
        raise ValueError(f"{path}: floor must be a number >= 0")
    for name, series in figure["series"].items():
        if not series or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and v >= 0
                                                                              for v in p) for p in series):
            raise ValueError(f"{path}: series {name!r} must be a list of [x, y] pairs of numbers >= 0")
    return figure


def plot(args):
    check_writable(args.out, {".svg"})
    text = svg(read_figure(args.points))
    atomic_save(args.out, lambda f: f.write(text.encode()))
    print(f"wrote {args.out}")


def main(argv=None):
    p = ArgumentParser(prog="plot_fid.py", description=__doc__.split("\n")[0])
    p.add_argument("points", help="JSON file of the measured points")
    p.add_argument("out", help="the .svg file to write")
    exit_on_error("plot_fid.py", plot, p.parse_args(argv))


if __name__ == "__main__":
    main()
