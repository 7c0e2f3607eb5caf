"""The plots of an inspect report (matplotlib): pairwise cosine by layer (a heatmap), norms by
depth per family, sign agreement by layer, energy curves and, with --spectrum, effective rank by
layer. `html_page` is ONE self-contained page: every plot an inline SVG, followed by the data it
shows as a JSON block (`<script type="application/json" class="figure-data">`); no script,
style sheet or font is loaded from anywhere. `png_files` renders the same plots as PNG images."""

from __future__ import annotations

import html
import io
import json
import math
from typing import Any

from mergelang.diagnostics import MergelangError, error


def require_matplotlib() -> None:
    """E953 unless matplotlib can be imported (html and png reports need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MergelangError(error("E953", "html and png reports need matplotlib, which is not installed",
                                   None, 'pip install "mergelang[inspect]" (or matplotlib), or use '
                                   "--format json")) from None


def _layer_family(report: dict[str, Any]) -> dict[str, dict[int, float | None]]:
    """Layers, and for each "model: family" the relative norm ‖τ‖/‖base‖ per layer, summed from
    the tensors of that family in that layer."""
    sums: dict[tuple[str, str, int], list[float]] = {}
    for t in report["tensors"].values():
        if t["layer"] is None:
            continue
        for lab, m in t["models"].items():
            s = sums.setdefault((lab, t["family"], t["layer"]), [0.0, 0.0])
            s[0] += m["norm"] ** 2
            s[1] += m["base_norm"] ** 2
    series: dict[str, dict[int, float | None]] = {}
    for (lab, fam, layer), (ss, bs) in sums.items():
        series.setdefault(f"{lab}: {fam}", {})[layer] = math.sqrt(ss) / math.sqrt(bs) if bs else None
    return series


def figures(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, title, data) of every plot the report has data for."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    layers = sorted(int(k) for k in report["layers"])
    pairs = ["~".join(p) for p in report["pairs"]]
    by_layer = [report["layers"][str(i)] for i in layers]
    if pairs and layers:
        out.append(("cosine_by_layer", "Pairwise cosine of the task vectors, by layer",
                    {"layers": layers, "pairs": pairs,
                     "values": [[g["pairs"][p]["cosine"] for g in by_layer] for p in pairs]}))
    if layers:
        series = _layer_family(report)
        out.append(("norms_by_depth", "Relative norm ‖τ‖ / ‖base‖ by depth, per family",
                    {"layers": layers, "series": {k: [v.get(i) for i in layers]
                                                  for k, v in sorted(series.items())}}))
    if pairs and layers:
        out.append(("sign_agreement_by_layer", "Sign agreement (entries non-zero in both), by layer",
                    {"layers": layers, "pairs": pairs,
                     "values": [[g["pairs"][p]["sign_agreement"] for g in by_layer] for p in pairs]}))
    fr = report["energy_fractions"]
    out.append(("energy_curves", "Share of ‖τ‖² held by the largest |τ| entries (per-tensor top p %)",
                {"fractions": [0.0, *fr], "series": {
                    lab: [0.0, *(m["energy"][f"{f:g}"] for f in fr)]
                    for lab, m in report["total"]["models"].items()}}))
    if report.get("spectrum") and layers:
        out.append(("effective_rank_by_layer", "Mean effective rank of the 2-D task vectors, by layer",
                    {"layers": layers, "series": {lab: [g["models"][lab].get("mean_effective_rank")
                                                        for g in by_layer]
                                                  for lab in report["models"]}}))
    return out


def _plot(fid: str, title: str, data: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    nan = float("nan")
    if fid in ("cosine_by_layer", "sign_agreement_by_layer"):
        vals = [[nan if v is None else v for v in row] for row in data["values"]]
        lo, hi = (-1, 1) if fid == "cosine_by_layer" else (0, 1)
        im = ax.imshow(vals, aspect="auto", cmap="RdBu_r" if lo < 0 else "viridis", vmin=lo, vmax=hi,
                       interpolation="nearest")
        ax.set_yticks(range(len(data["pairs"])), data["pairs"])
        step = max(1, len(data["layers"]) // 16)
        ax.set_xticks(range(0, len(data["layers"]), step), data["layers"][::step])
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax)
    elif fid == "energy_curves":
        for lab, ys in data["series"].items():
            ax.plot([100 * f for f in data["fractions"]], [nan if y is None else y for y in ys],
                    marker="o", label=lab)
        ax.set_xlabel("top entries (% of each tensor)")
        ax.set_ylabel("share of ‖τ‖²")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    else:
        from matplotlib.ticker import MaxNLocator

        for lab, ys in data["series"].items():
            ax.plot(data["layers"], [nan if y is None else y for y in ys], marker=".", label=lab)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=6, ncol=2 if len(data["series"]) > 8 else 1)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig, plt


def _render(fid: str, title: str, data: dict[str, Any], fmt: str) -> bytes:
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "mergelang"
    fig, plt = _plot(fid, title, data)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Date": None} if fmt == "svg" else None)
    finally:
        plt.close(fig)
    return buf.getvalue()


def png_files(report: dict[str, Any]) -> dict[str, bytes]:
    return {f"{fid}.png": _render(fid, title, data, "png") for fid, title, data in figures(report)}


def _svg(fid: str, title: str, data: dict[str, Any]) -> str:
    text = _render(fid, title, data, "svg").decode("utf-8")
    return text[text.index("<svg"):]  # no XML prolog or DOCTYPE (a URL) inside HTML


def line_figure_svg(title: str, data: dict[str, Any]) -> str:
    """An inline SVG of `data`'s series by layer (run --report): drawn here, without matplotlib
    (its layout took ~0.4 s a figure, more than a small merge)."""
    w, h, left, right, top, bottom = 640, 300, 50, 150, 28, 36
    xs = data["layers"]
    ys = [y for ys in data["series"].values() for y in ys if y is not None and math.isfinite(y)]
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    y0, y1 = (min(0.0, *ys), max(1.0, *ys)) if ys else (0.0, 1.0)

    def px(x: float) -> float:
        return left + (w - left - right) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def py(y: float) -> float:
        return top + (h - top - bottom) * (1 - (y - y0) / (y1 - y0 if y1 > y0 else 1))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'font-family="sans-serif" font-size="11"><title>{html.escape(title)}</title>',
             f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
             'fill="none" stroke="#888"/>']
    for y in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in sorted({x0, x1, *xs[::max(1, len(xs) // 8)]}):
        parts.append(f'<text x="{px(x):.1f}" y="{h - bottom + 14}" text-anchor="middle">{x}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 4}" text-anchor="middle">layer</text>')
    for k, (lab, series) in enumerate(data["series"].items()):
        color = _COLORS[k % len(_COLORS)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, series)
                       if y is not None and math.isfinite(y))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{w - right + 8}" y="{top + 14 * (k + 1)}" fill="{color}">'
                     f'{html.escape(lab)}</text>')
    return "".join(parts) + "</svg>"


_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _json_block(data: Any) -> str:
    from mergelang.tools.inspect_stats import json_safe

    return json.dumps(json_safe(data), allow_nan=False).replace("</", "<\\/")


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def html_page(report: dict[str, Any]) -> str:
    tot = report["total"]
    rows = "".join(
        f"<tr><td>{html.escape(lab)}</td><td>{_fmt(m['norm'])}</td><td>{_fmt(m['rel_norm'])}</td>"
        f"<td>{_fmt(m['max_abs'])}</td><td>{_fmt(m['zero_frac'])}</td></tr>"
        for lab, m in tot["models"].items())
    prow = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(p['cosine'])}</td>"
                   f"<td>{_fmt(p['sign_agreement'])}</td></tr>" for k, p in tot["pairs"].items())
    figs = "\n".join(
        f'<figure id="fig-{fid}"><figcaption>{html.escape(title)}</figcaption>\n{_svg(fid, title, data)}\n'
        f'<script type="application/json" class="figure-data" data-figure="{fid}">{_json_block(data)}'
        "</script></figure>" for fid, title, data in figures(report))
    pairs = (f"<h2>Pairs</h2><table><tr><th>pair</th><th>cosine</th><th>sign agreement</th></tr>"
             f"{prow}</table>") if prow else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mergelang inspect: {html.escape(report['base'])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}figure{{margin:2em 0}}
figure svg{{max-width:100%;height:auto}}</style></head><body>
<h1>mergelang inspect</h1>
<p>Base <code>{html.escape(report['inputs']['base'])}</code>; {len(report['tensors'])} tensors,
{len(report['skipped'])} skipped; {report['timing']['seconds']:.1f} s on {html.escape(report['device'])}.
Every number is in <code>report.json</code> beside this page.</p>
<h2>Task vectors τ = model − base (whole model)</h2>
<table><tr><th>model</th><th>‖τ‖</th><th>‖τ‖/‖base‖</th><th>max |τ|</th><th>zero fraction</th></tr>
{rows}</table>
{pairs}
{figs}
</body></html>
"""
