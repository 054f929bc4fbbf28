"""The checkpoint lineage as an SVG graph: the accepted chain from the start model to the final
one along the top, each rolled-back, failed or skipped attempt hanging below the checkpoint it
started from. Every node carries its status as a class and its reason as a tooltip."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, GAP_X, ROW_Y = 118, 44, 30, 86
FILL = {"start": "#e8e8e8", "accepted": "#c9ecc9", "rolled_back": "#f7c9c9", "failed": "#bbbbbb",
        "skipped": "#f2f2f2", "running": "#fff2b3", "interrupted": "#fff2b3", "error": "#f7c9c9"}


def _metric(metrics: dict | None, name: str) -> str:
    value = (metrics or {}).get(name)
    if isinstance(value, (int, float)):
        return f"{name.removeprefix('heldout_')} {value:.4g}"
    return ""


def lineage_svg(manifest: dict, metric: str = "heldout_ppl") -> str:
    stages = manifest.get("stages", [])
    nodes = [{"key": "start", "label": "start", "status": "start", "row": 0,
              "detail": _metric(manifest.get("baseline_metrics"), metric), "title": "the model the run began with"}]
    edges = []  # (from node index, to node index, status)
    current = 0  # the node of the accepted checkpoint
    for e in stages:
        status = e.get("status", "running")
        row = 0 if status == "accepted" else 1
        changed = "" if e.get("checkpoint") or status != "accepted" else " (model unchanged)"
        nodes.append({"key": e["key"], "label": e["key"], "status": status, "row": row,
                      "detail": _metric(e.get("metrics_after"), metric) or status.replace("_", " "),
                      "title": f"{e['key']}: {status.replace('_', ' ')}{changed}. {e.get('reason', '')}"})
        edges.append((current, len(nodes) - 1, status))
        if status == "accepted":
            current = len(nodes) - 1
    final = current
    width = len(nodes) * (WIDTH + GAP_X) + GAP_X
    height = ROW_Y + HEIGHT + 30 if any(n["row"] for n in nodes) else HEIGHT + 30
    x = lambda i: GAP_X + i * (WIDTH + GAP_X)  # noqa: E731
    y = lambda row: 12 + row * ROW_Y  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="lineage" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    rounds = [e.get("round", 1) for e in stages]
    for i in range(1, len(rounds)):
        if rounds[i] != rounds[i - 1]:
            sep = x(i + 1) - GAP_X / 2
            out.append(f'<line x1="{sep}" y1="0" x2="{sep}" y2="{height}" stroke="#999" stroke-dasharray="2,3"/>'
                       f'<text x="{sep + 4}" y="{height - 4}" fill="#777">round {rounds[i]}</text>')
    for a, b, status in edges:
        na, nb = nodes[a], nodes[b]
        x1, y1 = x(a) + WIDTH, y(na["row"]) + HEIGHT / 2
        x2, y2 = x(b), y(nb["row"]) + HEIGHT / 2
        if nb["row"]:  # an attempt that did not land: down from the checkpoint it started from, along, down
            x1, bus = x(a) + WIDTH / 2, y(0) + HEIGHT + (ROW_Y - HEIGHT) / 2
            path = f"M {x1} {y(na['row']) + HEIGHT} V {bus} H {x(b) + WIDTH / 2} V {y(nb['row'])}"
        else:
            path = f"M {x1} {y1} C {x1 + 20} {y1}, {x2 - 20} {y2}, {x2} {y2}"
        dash = ' stroke-dasharray="4,3"' if status != "accepted" else ""
        out.append(f'<path class="edge {status}" d="{path}" fill="none" stroke="#555"{dash} '
                   'marker-end="url(#arrow)"/>')
    for i, n in enumerate(nodes):
        cls = f"node {n['status']}" + (" final" if i == final else "")
        stroke = ' stroke-width="2.5"' if i == final else ""
        out.append(f'<g class="{cls}" data-key="{escape(n["key"])}"><title>{escape(n["title"])}</title>'
                   f'<rect x="{x(i)}" y="{y(n["row"])}" width="{WIDTH}" height="{HEIGHT}" rx="6" '
                   f'fill="{FILL.get(n["status"], "#fff")}" stroke="#555"{stroke}/>'
                   f'<text x="{x(i) + WIDTH / 2}" y="{y(n["row"]) + 18}" text-anchor="middle">{escape(n["label"])}'
                   f'</text><text x="{x(i) + WIDTH / 2}" y="{y(n["row"]) + 34}" text-anchor="middle" fill="#444">'
                   f'{escape(n["detail"])}{" · final" if i == final else ""}</text></g>')
    out.append("</svg>")
    return "\n".join(out)
