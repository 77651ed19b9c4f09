"""Self-contained HTML reports: a run's Markdown report as one HTML file that opens anywhere, offline.

Every local image is embedded as a base64 data URI, the stylesheet is inline, a table of contents is built from
the headings, and a Content-Security-Policy forbids loading anything else (no external resources, no scripts),
so ``report.html`` can be mailed, archived or attached to an issue on its own.
"""

from __future__ import annotations

import base64
import html
import re
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt
from markdown_it.token import Token

__all__ = ["IMAGE_TYPES", "markdown_to_html", "report_title", "slugify"]

IMAGE_TYPES: dict[str, str] = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".svg": "image/svg+xml",
}

# Nothing may be fetched: images come as data URIs, styles are inline, scripts are not allowed at all.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

STYLE = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --stripe: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; font: 16px/1.55 system-ui, -apple-system, "Segoe UI",
  Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 2rem 1.25rem 4rem; }
h1, h2, h3, h4 { line-height: 1.25; margin: 1.6em 0 0.6em; }
h1 { font-size: 1.9rem; border-bottom: 1px solid var(--line); padding-bottom: 0.3em; margin-top: 0.4em; }
h2 { font-size: 1.45rem; border-bottom: 1px solid var(--line); padding-bottom: 0.25em; }
h3 { font-size: 1.15rem; }
p, ul, ol, table, pre, blockquote { margin: 0 0 1em; }
a { color: var(--accent); }
code { font: 0.88em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--stripe);
  padding: 0.1em 0.35em; border-radius: 4px; overflow-wrap: anywhere; }
pre { background: var(--stripe); padding: 0.8em 1em; border-radius: 6px; overflow-x: auto; }
pre code { background: none; padding: 0; }
blockquote { color: var(--muted); border-left: 4px solid var(--line); margin-left: 0; padding: 0 1em; }
table { border-collapse: collapse; display: block; max-width: 100%; overflow-x: auto; font-size: 0.95em; }
th, td { border: 1px solid var(--line); padding: 0.35em 0.75em; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
tbody tr:nth-child(even) { background: var(--stripe); }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.missing-image { display: inline-block; color: #9a3412; background: #fff7ed; border: 1px dashed #f97316;
  padding: 0.4em 0.8em; border-radius: 6px; font-size: 0.92em; }
nav.toc { background: var(--stripe); border: 1px solid var(--line); border-radius: 6px; padding: 0.6em 1.2em;
  margin: 0 0 1.5em; font-size: 0.95em; }
nav.toc h2 { font-size: 1rem; margin: 0.2em 0 0.4em; border: 0; padding: 0; }
nav.toc ul { margin: 0; padding-left: 1.2em; }
nav.toc li { margin: 0.1em 0; }
footer { color: var(--muted); font-size: 0.85em; border-top: 1px solid var(--line); margin-top: 3em;
  padding-top: 0.8em; }
@media print { nav.toc { display: none; } main { max-width: none; } }
"""


def slugify(text: str) -> str:
    """A URL fragment for a heading: lower case ASCII words joined by hyphens (``section`` when nothing is left)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug or "section"


def report_title(markdown: str, default: str) -> str:
    """The text of the report's first level-1 heading, or ``default`` when it has none."""
    tokens = _parser().parse(markdown)
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.tag == "h1":
            return _plain_text(tokens[i + 1]) or default
    return default


def _parser() -> MarkdownIt:
    # CommonMark with GitHub tables and strikethrough; raw HTML in the Markdown is shown as text, never executed.
    return MarkdownIt("commonmark", {"html": False, "typographer": False}).enable(["table", "strikethrough"])


def _plain_text(inline: Token) -> str:
    """The visible text of an inline token (code spans and emphasis flattened)."""
    parts = [child.content for child in inline.children or [] if child.type in ("text", "code_inline")]
    return "".join(parts).strip() or inline.content.strip()


def _image_data_uri(src: str, base_dir: Path) -> tuple[str | None, str]:
    """(data URI, reason): the data URI of a local image under ``base_dir``, or None and why it was not embedded."""
    parts = urlsplit(src)
    if parts.scheme == "data":
        return src, ""
    if parts.scheme or parts.netloc:
        return None, "external image not embedded"
    rel = unquote(parts.path)
    mime = IMAGE_TYPES.get(Path(rel).suffix.lower())
    if mime is None:
        return None, "not an image file"
    root = base_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        return None, "image outside the report folder"
    if not path.is_file():
        return None, "missing image"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}", ""


def markdown_to_html(markdown: str, base_dir: Path, title: str) -> str:
    """Render a Markdown report as one self-contained HTML page (images embedded, inline CSS, table of contents).

    Images are looked up relative to ``base_dir`` (``plots/x.png`` -> ``base_dir/plots/x.png``); one that is missing,
    outside ``base_dir`` or remote is replaced by a visible note, so the page never shows a broken image nor loads
    anything. Headings get stable ``id`` anchors and a table of contents links them (placed after the title when the
    report opens with its only level-1 heading).
    """
    md = _parser()
    base_dir = Path(base_dir)
    tokens = md.parse(markdown)

    toc: list[tuple[int, str, str]] = []
    used: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        text = _plain_text(tokens[i + 1])
        slug = slugify(text)
        n = used.get(slug, 0)
        used[slug] = n + 1
        anchor = slug if n == 0 else f"{slug}-{n + 1}"
        token.attrSet("id", anchor)
        toc.append((int(token.tag[1]), text, anchor))
    # A report opening with its only level-1 heading (its title) gets the contents of its sections after it.
    split = 0
    if toc and toc[0][0] == 1 and sum(level == 1 for level, _, _ in toc) == 1 and tokens[0].type == "heading_open":
        split = next(i for i, t in enumerate(tokens) if t.type == "heading_close") + 1
        toc = toc[1:]

    def render_image(_renderer: Any, tokens: list[Token], idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        alt = md.renderer.renderInlineAsText(token.children or [], options, env)
        uri, reason = _image_data_uri(src, base_dir)
        if uri is None:
            label = f"{alt} ({src})" if alt else src
            note = f"{html.escape(reason)}: {html.escape(label)}"
            return f'<span class="missing-image" role="img" aria-label="{html.escape(reason)}">{note}</span>'
        title_attr = token.attrGet("title")
        extra = f' title="{html.escape(str(title_attr))}"' if title_attr else ""
        return f'<img src="{uri}" alt="{html.escape(alt)}"{extra}>'

    md.add_render_rule("image", render_image)
    env: dict[str, Any] = {}
    head = md.renderer.render(tokens[:split], md.options, env)
    body = md.renderer.render(tokens[split:], md.options, env)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="ssah">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            "<main>",
            head,
            _toc_html(toc),
            body,
            '<footer>Written by ssah from <a href="report.md">report.md</a>; '
            "every figure is embedded in this file.</footer>",
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )


def _toc_html(toc: list[tuple[int, str, str]]) -> str:
    """A nested list of links to the headings (empty when there are none)."""
    if not toc:
        return ""
    top = min(level for level, _, _ in toc)
    out = ['<nav class="toc" aria-label="Contents">', "<h2>Contents</h2>", "<ul>"]
    depth = 0
    for n, (level, text, anchor) in enumerate(toc):
        target = min(level - top, depth + 1)  # never skip a nesting level, even when the headings do
        if n and target > depth:
            out.append("<ul>")  # inside the previous, still open, item
            depth = target
        elif n:
            out.append("</li>")
            while depth > target:
                out.append("</ul></li>")
                depth -= 1
        else:
            depth = 0
        out.append(f'<li><a href="#{html.escape(anchor)}">{html.escape(text)}</a>')
    out.append("</li>")
    out += ["</ul></li>"] * depth
    out += ["</ul>", "</nav>"]
    return "\n".join(out)
