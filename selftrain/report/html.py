"""report.md -> report.html: one self-contained file (images inlined as data URIs, the lineage graph
as inline SVG, no script, no network), rendered by markdown-it (CommonMark plus tables)."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from markdown_it import MarkdownIt

MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
code { background: #f3f3f3; padding: 0 3px; }
.lineage { overflow-x: auto; border: 1px solid #eee; padding: 6px; }
"""


def _image_rule(root: Path, svg_inline: dict[str, str]):
    """A markdown-it render rule for images: a file inside the run directory becomes a data URI (named
    SVGs are put inline); anything else (a URL, a path outside the run, a missing file) is shown as
    text and never fetched, whatever attributes the Markdown gave it."""
    resolved_root = root.resolve()

    def render(_renderer, tokens, idx, options, env):
        token = tokens[idx]
        src, alt = str(token.attrGet("src") or ""), escape(token.content or "")
        if src in svg_inline:
            return f'<div class="lineage">{svg_inline[src]}</div>'
        path = (root / src).resolve() if "://" not in src and not src.startswith("data:") else None
        mime = MIME.get(path.suffix.lower()) if path is not None else None
        if mime is None or not path.is_relative_to(resolved_root) or not path.is_file():
            return f"<em>[image not shown: {escape(src)}]</em>"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:{mime};base64,{data}" alt="{alt}">'

    return render


def markdown_to_html(markdown: str, root: Path, title: str, svg_inline: dict[str, str] | None = None) -> str:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("image", _image_rule(root, svg_inline or {}))
    body = md.render(markdown)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")
