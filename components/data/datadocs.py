"""The Data Docs site of a validation: its history of runs and its offline rendering.

GX 1.24 writes static pages that load bootstrap, jquery, bootstrap-table and font-awesome from CDNs
and GX's logos from its own web server. `make_offline` copies the vendored files of
``components/data/datadocs_assets`` (npm packages; licences in its README) into the site and points
every page at them; `offline_problems` lists anything that would still need a network. The site keeps
the last `HISTORY` validations (`prune_history`).
"""
from __future__ import annotations

import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

HISTORY = 20  # validations a Data Docs site keeps (the oldest go first)
ASSETS_DIR = Path(__file__).resolve().parent / "datadocs_assets"  # see its README.md
RESULTS_DIR = "validation_results"  # the site's GX validation results (JSON), one per page in validations/
VENDOR_DIR = ("static", "vendor")  # where a site gets its copy of ASSETS_DIR
CDN_ASSETS = {  # URL in GX 1.24's page templates -> file in ASSETS_DIR
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
}
GX_WEB_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"  # GX's logos (in static/images)
VEGA_TAG = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/vega[^"]*"></script>[ \t]*\n?')


def validation_runs(docs: Path) -> list[tuple[str, ...]]:
    """The validations a site holds, oldest first, as (run time, suite, run name, batch) keys: its results in
    validation_results/ and its pages in validations/ (<suite>/<run name>/<run time>/<batch>.json|html)."""
    keys = set()
    for folder, suffix in ((RESULTS_DIR, ".json"), ("validations", ".html")):
        for path in (docs / folder).glob(f"*/*/*/*{suffix}") if (docs / folder).is_dir() else []:
            keys.add((path.parent.name, path.parent.parent.parent.name, path.parent.parent.name, path.stem))
    return sorted(keys)


def prune_history(docs: Path, keep: int = HISTORY - 1) -> list[tuple[str, ...]]:
    """Remove all but the newest `keep` validations of a site (result and page; folders left empty too).

    Args:
        docs: The Data Docs folder.
        keep: How many validations stay (the run about to be added comes on top).

    Returns:
        The (run time, suite, run name, batch) keys removed.
    """
    runs = validation_runs(docs)
    removed = runs[:max(len(runs) - keep, 0)]
    for run_time, suite, run_name, batch in removed:
        for folder, suffix in ((RESULTS_DIR, ".json"), ("validations", ".html")):
            path = docs / folder / suite / run_name / run_time / f"{batch}{suffix}"
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != docs and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    return removed


def make_offline(docs: Path) -> None:
    """Make a Data Docs site render without network: copy the vendored assets to static/vendor and point
    every page's CDN links at them (idempotent; earlier pages are rewritten again harmlessly).

    Args:
        docs: The Data Docs folder GX has just written.
    """
    shutil.copytree(ASSETS_DIR, docs.joinpath(*VENDOR_DIR), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    styles = docs / "static" / "styles" / "data_docs_default_styles.css"
    if styles.is_file():  # the dark theme's logo is fetched from GX's web bucket; use the shipped one
        css = styles.read_text(encoding="utf-8")
        fixed = css.replace(f"{GX_WEB_ASSETS}full_logo_dark.png", "../images/logo-long.png")
        if fixed != css:
            styles.write_text(fixed, encoding="utf-8")
    for page in docs.rglob("*.html"):
        if page.is_relative_to(docs / "static"):
            continue
        html = page.read_text(encoding="utf-8")
        root = Path(os.path.relpath(docs, page.parent)).as_posix()
        offline = offline_html(html, root, docs)
        if offline != html:
            page.write_text(offline, encoding="utf-8")


def offline_html(html: str, root: str, docs: Path) -> str:
    """One page with its CDN assets replaced by the site's copies.

    Args:
        html: The page.
        root: Relative path from the page's folder to the site root ("." or "../../..").
        docs: The site root (to check that a GX image exists locally).

    Returns:
        The page: CDN URLs -> ``<root>/static/vendor/<file>`` (without the integrity and crossorigin
        attributes, which a browser enforces as CORS on file:// pages), GX's hosted logo -> static/images,
        links into static/ made relative to the site root, and the vega script tags dropped when the page draws no chart.
    """
    vendor = "/".join((root, *VENDOR_DIR))
    for url, local in CDN_ASSETS.items():
        html = html.replace(f'"{url}"', f'"{vendor}/{local}"')
    html = re.sub(r'\s+(?:integrity|crossorigin)="[^"]*"', "", html)
    # GX links static/ one level short from validation pages (validations/<suite>/<run>/<time>/)
    html = re.sub(r'(["\'])(?:\./|(?:\.\./)+)static/', lambda m: f"{m.group(1)}{root}/static/", html)

    def image(match: re.Match) -> str:
        local = docs / "static" / "images" / match.group(1)
        return f"{root}/static/images/{match.group(1)}" if local.is_file() else match.group(0)
    html = re.sub(re.escape(GX_WEB_ASSETS) + r'([\w.-]+)(?:\?[^"\']*)?', image, html)
    if "vegaEmbed" not in html:
        html = VEGA_TAG.sub("", html)
    return html


class _AssetLinks(HTMLParser):
    """Collects what a page loads: script src, link href (stylesheets, icons), img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img") and values.get("src"):
            self.urls.append(values["src"])
        elif tag == "link" and values.get("href"):
            self.urls.append(values["href"])


def offline_problems(docs: str | Path) -> list[str]:
    """What stops a Data Docs site from rendering offline: assets loaded from the network, and local
    assets (pages' scripts, stylesheets and images; url() in the site's CSS) that do not exist.

    Args:
        docs: The Data Docs folder.

    Returns:
        One line per problem ("page: url"); empty when the site is self-contained.
    """
    docs, problems = Path(docs), []
    for page in sorted(docs.rglob("*.html")):
        parser = _AssetLinks()
        parser.feed(page.read_text(encoding="utf-8"))
        problems += [f"{page.relative_to(docs)}: {url}" for url in parser.urls if _missing(url, page.parent)]
    for sheet in sorted(docs.rglob("*.css")):
        urls = re.findall(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)", sheet.read_text(encoding="utf-8"))
        problems += [f"{sheet.relative_to(docs)}: {url}" for url in urls if _missing(url, sheet.parent)]
    return problems


def _missing(url: str, base: Path) -> bool:
    """True for a network URL or a relative path that does not exist under base (data: and # are fine)."""
    if url.startswith(("data:", "#")):
        return False
    if re.match(r"^[a-z][a-z0-9+.-]*:|^//", url, re.IGNORECASE):
        return True
    return not (base / url.split("?")[0].split("#")[0]).exists()
