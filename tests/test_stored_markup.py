"""What one user stores never runs as markup in the page of another who looks at it: a face's stored thumbnail (any
payload in `faces-<gallery>` is whoever has `collections:write`'s) and the Markdown repo.document writes (a model's
words about code that comments can steer, and the repository's own paths). Found by a review."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from bkg_kernel.client.repo import Docs
from bkg_kernel.pictures.faces import gallery_html

ATTACK = "<img src=x onerror=alert(1)>"


def live_markup(html: str) -> list[str]:
    """What a browser would run in `html`, read as a browser reads it: script elements, event-handler attributes
    and `javascript:` URLs (the same words escaped as text are not)."""
    found: list[str] = []

    class Reader(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "script":
                found.append(tag)
            for name, value in attrs:
                if name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                    found.append(f"{tag} {name}={value}")

    Reader().feed(html)
    return found


def test_a_stored_thumbnail_that_is_not_base64_is_never_put_in_an_img() -> None:
    good = base64.b64encode(b"\xff\xd8\xff\xe0jpeg bytes").decode()
    subjects = [
        {
            "subject": ATTACK,
            "faces": 3,
            "shown": [
                {"id": 1, "source": ATTACK, "thumb": "x' onerror='alert(1)"},
                {"id": 2, "source": "a.jpg", "thumb": {"not": "text"}},
                {"id": 3, "source": "b.jpg", "thumb": good},
            ],
        }
    ]
    html = gallery_html("g", subjects)
    assert live_markup(html) == [], live_markup(html)
    assert html.count("<img ") == 1 and f"base64,{good}'" in html
    assert html.count("bkg-nothumb") >= 2  # the two bad thumbnails show initials instead


def test_the_docs_repo_document_wrote_render_their_html_as_text() -> None:
    md = (
        "# `pkg/x`<img src=x onerror=alert(1)>`.py`\n\n## `f` (function)\n\n"
        f"The model wrote {ATTACK} and <script>alert(2)</script> and [a link](javascript:alert(3)).\n\n"
        "```\nif a < b and c > d: pass\n```\n"
    )
    html = Docs({"markdown": md})._repr_html_()
    assert live_markup(html) == [], html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;script&gt;" in html  # shown, as text
    assert "<h1>" in html and "<h2><code>f</code> (function)</h2>" in html
    assert "if a &lt; b and c &gt; d: pass" in html  # code keeps its characters
