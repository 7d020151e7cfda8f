"""``hfcompress report``: the size/quality trade-off of a set of recipes as a page of plots.

Points come from running recipes on a model here (compress in memory, then perplexity) or from a
results file (JSON lines with ``run``, ``weights_bytes`` and ``wikitext2_ppl``, as
``benchmarks/plan_vs_uniform.py`` writes them). The page (``index.html``) shows:

- the frontier: saved size against perplexity, one point per recipe, the unquantized model and
  the rounding (RTN) anchors marked, the recipes no other beats on both axes joined by a line;
- per-layer maps: each planned layer's bits (rows: module type, columns: block), one per recipe
  whose per-layer formats are known;
- the sensitivity profile: each block's summed cost per option (log scale), from a sensitivity
  file.

Plots are matplotlib PNGs beside the page. ``--card FOLDER`` copies the frontier plot into a
saved model folder, whose model card then shows it.
"""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..card import FRONTIER_PNG  # the name model cards look for
from ..errors import UserError

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass
class Point:
    name: str
    nbytes: int
    perplexity: float
    kind: str = "recipe"  # recipe, float (the unquantized model) or anchor (rounding to nearest)
    formats: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (bits, group_size)


def read_results(path: str | Path, modules: list[str] | None = None) -> list[Point]:
    """Points from JSON lines holding ``run``, ``weights_bytes`` and ``wikitext2_ppl``; with the
    layer names ``modules``, a line's ``recipe`` (a file) gives its per-layer formats."""
    from ..recipe import Recipe

    points = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"--results {path}: {err.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"--results {path}, line {number}: not JSON") from None
        if {"run", "weights_bytes", "wikitext2_ppl"} <= set(record):
            kind = "float" if record["run"] == "float" else "anchor" if "rtn" in record["run"] else "recipe"
            formats = {}
            recipe = Path(path).parent / record["recipe"] if record.get("recipe") else None
            if modules and recipe is not None and recipe.is_file():
                stage = next((s for s in Recipe.load(recipe).stages if s.name == "quantize"), None)
                formats = {name: stage.format_of(name) for name in modules} if stage else {}
            points.append(Point(record["run"], int(record["weights_bytes"]), float(record["wikitext2_ppl"]), kind,
                                formats))
    if not points:
        raise UserError(f"--results {path}: no line holds run, weights_bytes and wikitext2_ppl")
    return points


def frontier(points: list[Point]) -> list[Point]:
    """The points no other point beats on both size and perplexity, smallest first."""
    best, result = float("inf"), []
    for point in sorted(points, key=lambda p: (p.nbytes, p.perplexity)):
        if point.perplexity < best:
            result.append(point)
            best = point.perplexity
    return result


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("hfcompress report draws with matplotlib: pip install 'hfcompress[report]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(points: list[Point], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"recipe": ("o", "tab:blue"), "anchor": ("s", "tab:orange"), "float": ("*", "tab:green")}
    for kind, (marker, color) in styles.items():
        chosen = [p for p in points if p.kind == kind]
        if chosen:
            ax.scatter([p.nbytes / 1e6 for p in chosen], [p.perplexity for p in chosen], marker=marker, color=color,
                       s=60 if kind != "float" else 160, label={"recipe": "recipes", "anchor": "rounding (RTN)",
                                                                   "float": "unquantized"}[kind], zorder=3)
    line = frontier(points)
    ax.plot([p.nbytes / 1e6 for p in line], [p.perplexity for p in line], color="gray", lw=1, zorder=2,
            label="frontier")
    for p in points:
        ax.annotate(p.name, (p.nbytes / 1e6, p.perplexity), textcoords="offset points", xytext=(5, 4), fontsize=8)
    sizes = [p.nbytes for p in points]
    if max(sizes) > 3 * min(sizes):  # an unquantized model several times larger than the rest
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)  # 200, 300: not 2x10^2
        ax.set_xlabel("saved size of the weights (MB, log scale)")
    else:
        ax.set_xlabel("saved size of the weights (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Size against quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _layer_grid(formats: dict[str, tuple[int, int]]):
    """``(module types, block numbers, bits[type][block])`` from layer names like ``model.layers.3.mlp.up_proj``."""
    cells = {}
    for name, (bits, _) in formats.items():
        match = _BLOCK.match(name)
        if match:
            cells[(match.group(3), int(match.group(2)))] = bits
    kinds = list(dict.fromkeys(kind for kind, _ in cells))
    blocks = sorted({block for _, block in cells})
    return kinds, blocks, [[cells.get((kind, block), float("nan")) for block in blocks] for kind in kinds]


def plot_bits_map(formats: dict[str, tuple[int, int]], title: str, path: Path) -> bool:
    kinds, blocks, grid = _layer_grid(formats)
    if not blocks:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(blocks) + 2), 0.45 * len(kinds) + 1.6), dpi=120)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=8)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="bits")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_sensitivity(sensitivity, path: Path) -> None:
    """Each block's summed predicted cost per option (nats per token, log scale)."""
    plt = _pyplot()
    blocks: dict[int, list[int]] = {}
    for i, name in enumerate(sensitivity.modules):
        match = _BLOCK.match(name)
        blocks.setdefault(int(match.group(2)) if match else -1, []).append(i)
    order = sorted(b for b in blocks if b >= 0)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for j, (bits, group) in enumerate(sensitivity.options):
        values = [float(sensitivity.cost[blocks[b], j].sum()) for b in order]
        ax.plot(order, [max(v, 1e-12) for v in values], marker="o", ms=3, label=f"{bits}-bit g{group}")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("predicted loss increase (nats/token)")
    ax.set_title("Sensitivity: what quantizing each block costs")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(directory: str | Path, points: list[Point], sensitivity=None, title: str = "hfcompress report") -> Path:
    """Write ``index.html`` and its PNGs into ``directory`` (replaced whole: written aside, then renamed)."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        plot_frontier(points, staging / FRONTIER_PNG)
        images = [(FRONTIER_PNG, "Saved size against perplexity; the line joins the recipes no other beats on "
                                 "both.")]
        for point in points:
            if point.formats:
                png = f"bits-{re.sub(r'[^A-Za-z0-9_.-]', '_', point.name)}.png"
                if plot_bits_map(point.formats, f"{point.name}: bits per layer", staging / png):
                    images.append((png, f"{point.name}: each layer's bit width."))
        if sensitivity is not None:
            plot_sensitivity(sensitivity, staging / "sensitivity.png")
            images.append(("sensitivity.png", "Predicted cost of quantizing each block, per option."))
        best = {id(p) for p in frontier(points)}
        rows = "\n".join(
            f"<tr><td>{html.escape(p.name)}</td><td>{html.escape(p.kind)}</td><td>{p.nbytes / 1e6:.2f}</td>"
            f"<td>{p.perplexity:.3f}</td><td>{'yes' if id(p) in best else ''}</td></tr>"
            for p in sorted(points, key=lambda p: p.nbytes))
        figures = "\n".join(f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>" for src, caption in images)
        page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
img{{max-width:100%}}figure{{margin:2em 0}}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<table>
<thead><tr><th>recipe</th><th>kind</th><th>size (MB)</th><th>perplexity</th><th>on the frontier</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{figures}
</body>
</html>
"""
        (staging / "index.html").write_text(page, encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory / "index.html"
