"""A finished run's output notebook as one self-contained HTML page that asks no other host for anything.

nbconvert's lab template loads require.js, MathJax, Mermaid and the widget manager from public CDNs; bkg works
offline and keeps what it serves on the machine (as the dashboards and the lab serve their assets locally), so
those script tags are left out: outputs (embedded images, tables, text) need none of them, and LaTeX and Mermaid
sources show as written. Markdown images next to the notebook are embedded as data URIs, and a Content Security
Policy in the page forbids fetches from anywhere but the page's own origin and `data:`/`blob:` URIs, so what a
notebook's own output points at (an `<img src="https://...">`) is not fetched either, in the gateway or opened
from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbconvert import HTMLExporter

# a <meta> policy cannot sandbox: the gateway's `Content-Security-Policy: sandbox` header stays what stops scripts
POLICY = (
    "default-src 'none'; img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; form-action 'none'"
)
TEMPLATE = "bkg-offline.html.j2"
# lab's index.html.j2 with every block that names a CDN emptied, and the policy first in <head>
SOURCE = f"""{{%- extends 'index.html.j2' -%}}
{{%- block html_head -%}}
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
{{{{ super() }}}}
{{%- endblock html_head -%}}
{{%- block html_head_js_requirejs -%}}{{%- endblock html_head_js_requirejs -%}}
{{%- block jupyter_widgets -%}}{{%- endblock jupyter_widgets -%}}
{{%- block html_head_js_mathjax -%}}{{%- endblock html_head_js_mathjax -%}}
{{%- block html_head_js_mermaidjs -%}}{{%- endblock html_head_js_mermaidjs -%}}
"""


def exporter(folder: str | None = None) -> tuple[HTMLExporter, dict[str, Any]]:
    """The HTML exporter and resources for a notebook whose relative images lie in `folder`."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    html = HTMLExporter(
        template_name="lab", template_file=TEMPLATE, extra_loaders=[DictLoader({TEMPLATE: SOURCE})],
        embed_images=folder is not None,
    )  # fmt: skip
    return html, {"metadata": {"path": folder or ""}}


def render_html(output: str, html: str, folder: str | None = None) -> str | None:
    """Render an output notebook to HTML at `html` (images under `folder` embedded); None when it cannot."""
    try:
        import nbformat

        nb = nbformat.reads(Path(output).read_text(encoding="utf-8"), as_version=4)
        exp, resources = exporter(folder)
        body, _ = exp.from_notebook_node(nb, resources=resources)
        tmp = Path(html).with_suffix(".tmp")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(html)
        return html
    except Exception:
        return None
