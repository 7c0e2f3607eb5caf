"""`mergelang explain --format html`: the picture without Graphviz. The DOT that explain writes
(explain.py; only the subset it emits: nodes with a label and a shape, edges, clusters) is laid
out here in pure Python, as layers from left to right (a node's column is its longest path from
a source; nodes in a column are ordered by the mean position of their predecessors), and drawn
as inline SVG inside one self-contained HTML page: no script, no stylesheet or font from
elsewhere, so it works after a plain `pip install` and opens offline. Every label is escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

CHAR_W, LINE_H, PAD, COL_GAP, ROW_GAP, CLUSTER_GAP = 6.6, 14.0, 8.0, 48.0, 14.0, 28.0
FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
_LABEL = r'label="((?:[^"\\]|\\.)*)"'


@dataclass
class Node:
    id: str
    label: str
    shape: str = "box"
    fill: str | None = None
    dashed: bool = False
    w: float = 0.0
    h: float = 0.0
    x: float = 0.0
    y: float = 0.0


@dataclass
class Cluster:
    label: str
    nodes: list[str] = field(default_factory=list)
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), s)


def parse_dot(text: str) -> tuple[dict[str, Node], list[tuple[str, str]], list[Cluster]]:
    """The nodes, edges and clusters of DOT as explain.py writes it."""
    nodes: dict[str, Node] = {}
    edges: list[tuple[str, str]] = []
    clusters: list[Cluster] = []
    current: Cluster | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("subgraph cluster_"):
            current = Cluster("")
            clusters.append(current)
        elif s == "}" and current is not None:
            current = None
        elif current is not None and s.startswith("label="):
            m = re.match(_LABEL, s)
            current.label = _unescape(m.group(1)) if m else ""
        elif m := re.fullmatch(r"(\w+) -> (\w+);", s):
            edges.append((m.group(1), m.group(2)))
        elif (m := re.match(r"(\w+) \[(.*)\];$", s)) and m.group(1) not in ("node", "graph", "edge"):
            attrs = m.group(2)
            lab = re.search(_LABEL, attrs)
            shape = re.search(r"shape=(\w+)", attrs)
            fill = re.search(r'fillcolor="(#[0-9A-Fa-f]{6})"', attrs)
            node = Node(m.group(1), _unescape(lab.group(1)) if lab else m.group(1),
                        shape.group(1) if shape else "box", fill.group(1) if fill else None,
                        "style=dashed" in attrs)
            nodes[node.id] = node
            if current is not None:
                current.nodes.append(node.id)
    return nodes, [(a, b) for a, b in edges if a in nodes and b in nodes], clusters


def _size(n: Node) -> None:
    lines = n.label.split("\n")
    n.w = max(len(x) for x in lines) * CHAR_W + 2 * PAD + (16 if n.shape == "ellipse" else 0)
    n.h = len(lines) * LINE_H + 2 * PAD


def _layout(ids: list[str], nodes: dict[str, Node], edges: list[tuple[str, str]],
            x0: float, y0: float, reorder: bool = True) -> tuple[float, float]:
    """Place `ids` in columns from (x0, y0); returns the width and height used. `reorder`: order
    a column by its nodes' predecessors (fewer crossings), else keep the DOT's order (the rules
    in recipe order)."""
    inside = set(ids)
    preds: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in edges:
        if a in inside and b in inside:
            preds[b].append(a)
    rank: dict[str, int] = {}

    def rank_of(i: str, stack: tuple[str, ...] = ()) -> int:
        if i not in rank:
            rank[i] = 0  # a cycle (none is drawn by explain) ends here
            rank[i] = max((rank_of(p, stack + (i,)) + 1 for p in preds[i] if p not in stack), default=0)
        return rank[i]

    for i in ids:
        rank_of(i)
    cols: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for i in ids:
        cols[rank[i]].append(i)
    pos: dict[str, float] = {}
    for c in cols:
        if reorder and any(preds[i] for i in c):
            first = {i: k for k, i in enumerate(c)}
            c.sort(key=lambda i: (sum(pos[p] for p in preds[i] if p in pos) / max(1, len(preds[i]))
                                  if preds[i] else -1, first[i]))
        y = 0.0
        for i in c:
            pos[i] = y
            y += nodes[i].h + ROW_GAP
    heights = [sum(nodes[i].h for i in c) + ROW_GAP * (len(c) - 1) for c in cols]
    total_h = max(heights, default=0.0)
    x = x0
    for c, h in zip(cols, heights):
        width = max(nodes[i].w for i in c)
        for i in c:
            nodes[i].x = x + (width - nodes[i].w) / 2
            nodes[i].y = y0 + (total_h - h) / 2 + pos[i]
        x += width + COL_GAP
    return max(0.0, x - x0 - COL_GAP), total_h


def layout(nodes: dict[str, Node], edges: list[tuple[str, str]], clusters: list[Cluster]) -> tuple[float, float]:
    """Positions for every node (clusters stacked top to bottom); the drawing's size."""
    for n in nodes.values():
        _size(n)
    in_cluster = {i for c in clusters for i in c.nodes}
    free = [i for i in nodes if i not in in_cluster]
    width, y = 0.0, PAD
    if free:
        w, h = _layout(free, nodes, edges, PAD, y, reorder=False)
        width, y = max(width, w), y + h + CLUSTER_GAP
    for c in clusters:
        head = (c.label.count("\n") + 1) * LINE_H + PAD
        w, h = _layout(c.nodes, nodes, edges, 2 * PAD, y + head + PAD)
        label_w = max((len(x) for x in c.label.split("\n")), default=0) * CHAR_W
        c.box = (PAD, y, max(w, label_w) + 2 * PAD, h + head + 2 * PAD)
        width, y = max(width, c.box[2]), y + c.box[3] + CLUSTER_GAP
    return width + 2 * PAD, y


def _text(x: float, y: float, label: str, anchor: str = "middle") -> str:
    spans = "".join(f'<tspan x="{x:.1f}" dy="{LINE_H if k else 0:.1f}">{escape(line)}</tspan>'
                    for k, line in enumerate(label.split("\n")))
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{spans}</text>'


def to_svg(dot_text: str) -> str:
    """DOT (as explain writes it) drawn as a standalone SVG element."""
    nodes, edges, clusters = parse_dot(dot_text)
    width, height = layout(nodes, edges, clusters)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family={quoteattr(FONT)} font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for c in clusters:
        x, y, w, h = c.box
        out.append(f'<g class="cluster"><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                   f'rx="6" fill="#fafafa" stroke="#bbb"/>{_text(x + PAD, y + PAD + 10, c.label, "start")}</g>')
    for a, b in edges:
        s, t = nodes[a], nodes[b]
        x1, y1, x2, y2 = s.x + s.w, s.y + s.h / 2, t.x, t.y + t.h / 2
        if x2 <= x1:  # same column (not drawn by explain's DOT): a loop around the right side
            x2, y2 = t.x + t.w, t.y + t.h / 2
        mid = (x1 + x2) / 2 if x2 > x1 else max(x1, x2) + COL_GAP / 2
        out.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} '
                   f'{x2:.1f},{y2:.1f}" fill="none" stroke="#555" marker-end="url(#arrow)"/>')
    for n in nodes.values():
        fill = n.fill or "#ffffff"
        dash = ' stroke-dasharray="4 3"' if n.dashed else ""
        if n.shape == "ellipse":
            shape = (f'<ellipse cx="{n.x + n.w / 2:.1f}" cy="{n.y + n.h / 2:.1f}" rx="{n.w / 2:.1f}" '
                     f'ry="{n.h / 2:.1f}" fill="{fill}" stroke="#333"{dash}/>')
        elif n.shape == "plaintext":
            shape = ""
        else:
            shape = (f'<rect x="{n.x:.1f}" y="{n.y:.1f}" width="{n.w:.1f}" height="{n.h:.1f}" rx="3" '
                     f'fill="{fill}" stroke="#333"{dash}/>')
        out.append(f'<g class="node" id={quoteattr("n-" + n.id)}>{shape}'
                   f'{_text(n.x + n.w / 2, n.y + PAD + 10, n.label)}</g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_html(dot_text: str, title: str) -> str:
    """A self-contained HTML page holding the picture (inline SVG)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
            f"<title>{escape(title)}</title>\n"
            "<style>body{margin:16px;font-family:sans-serif}h1{font-size:15px}</style>\n"
            f"</head>\n<body>\n<h1>{escape(title)}</h1>\n{to_svg(dot_text)}</body>\n</html>\n")
