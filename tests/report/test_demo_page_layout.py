"""The demo page with many methods (issue 19, item 1): every method is listed, table cells cannot run
into each other, and the map grid is horizontally compact.

No browser can be installed here (no download of browser builds), so the layout is asserted on the
generated HTML and on the values of its style sheet: the CSS custom properties that size the grid
(--thumb, --cellpad, --rowhead, ...) and the rules that use them, from which the width of a row of
maps follows. When WeasyPrint (a pip-installable HTML/CSS layout engine that needs no browser) is
importable, `test_rendered_layout` also lays the page out at 1400 px and checks the boxes themselves.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

from saliencylab.report import DemoCell, DemoMethod, DemoRow, MetricsTable, save_png, write_demo_page

WINDOW = 1400  # px: the window width the issue measured at
NAMES = ([f"method_{i:02d}" for i in range(27)] + ["structured_attention_graph", "extremal_perturbation"])
PHOTOS = ["chelsea", "coffee", "rocket"]


def _page(tmp_path, methods=NAMES, photos=PHOTOS, layout=None):
    """A demo page like `run_demo` writes, with fake maps and scores."""
    rng = np.random.default_rng(0)
    save_png(tmp_path / "photo.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    save_png(tmp_path / "map.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    rows = [DemoRow(p, "tabby cat", 0.5, "photo.png", note="expected: tabby",
                    cells={m: DemoCell(image="map.png", title=f"{p} / {m}") for m in methods}) for p in photos]
    rows[0].cells[methods[1]] = DemoCell(error="it broke")
    columns = [DemoMethod(m, f"about {m}", 0.01 * i, params={"steps": 8, "data": "sample_crops(n=64, seed=0)"},
                          cost={"forward_images": 30, "backward_images": 3}, images=len(photos))
               for i, m in enumerate(methods)]
    records = []
    for metric, higher in (("deletion", False), ("insertion", True)):
        for i, m in enumerate(methods):
            mean = 0.1 + 0.01 * i
            records.append(SimpleNamespace(method=m, metric=metric, mean=mean, low=mean - 0.05, high=mean + 0.05,
                                           higher_is_better=higher, scores=[mean] * len(photos)))
    table = MetricsTable.from_records(records, title="Faithfulness", figures=["photo.png"])
    meta = {"model": "tiny", "command": "saliencylab demo --full"}
    if layout:
        meta["layout"] = layout
    return write_demo_page(tmp_path, rows, columns, meta, tables=[table]).read_text()


class _Tables(HTMLParser):
    """Text and image sources of each <table>, by its class; the text of each row header (th scope=row)."""

    def __init__(self):
        super().__init__()
        self.tables, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"class": attrs.get("class", ""), "text": [], "src": [], "rowheads": [],
                                "rows": []})
            self.stack.append(self.tables[-1])
        elif self.stack:
            t = self.stack[-1]
            if tag == "tr":
                t["rows"].append([])
            elif tag in ("td", "th") and t["rows"]:
                t["rows"][-1].append(attrs)
                if attrs.get("scope") == "row":
                    t["rowheads"].append("")
                    t["in_head"] = True
            elif tag == "img":
                t["src"].append(attrs.get("src"))

    def handle_endtag(self, tag):
        if tag == "table" and self.stack:
            self.stack.pop()
        elif tag == "th" and self.stack:
            self.stack[-1]["in_head"] = False

    def handle_data(self, data):
        if self.stack:
            t = self.stack[-1]
            t["text"].append(data)
            if t.get("in_head"):
                t["rowheads"][-1] += data


def _tables(html):
    parser = _Tables()
    parser.feed(html)
    return {t["class"]: t for t in parser.tables}


def _css(html):
    """The page's style sheet as (selectors, {property: value}) rules, comments removed."""
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    style = re.sub(r"/\*.*?\*/", "", style, flags=re.S)
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", style):
        decls = dict((k.strip(), v.strip()) for k, _, v in (d.partition(":") for d in body.split(";")) if v.strip())
        rules.append(([s.strip() for s in selectors.split(",")], decls))
    return rules


def _decl(rules, selector, prop):
    """The value the last rule naming exactly `selector` gives `prop` (the cascade for equal specificity)."""
    value = None
    for selectors, decls in rules:
        if selector in selectors and prop in decls:
            value = decls[prop]
    return value


def _px(rules, value, scope=":root"):
    """A length in px: '90px', 'var(--x)' resolved in `scope` then :root, or a calc() of those."""
    value = value.strip()
    if value.startswith("calc("):
        expr = re.sub(r"var\((--[\w-]+)\)", lambda m: str(_px(rules, f"var({m.group(1)})", scope)), value[5:-1])
        expr = expr.replace("px", "")
        assert re.fullmatch(r"[\d\s.+*/()-]+", expr), expr
        return float(eval(expr))  # noqa: S307 - digits and operators only, checked above
    m = re.fullmatch(r"var\((--[\w-]+)\)", value)
    if m:
        inner = _decl(rules, scope, m.group(1)) or _decl(rules, ":root", m.group(1))
        assert inner is not None, f"{m.group(1)} is not defined"
        return _px(rules, inner, ":root" if inner.startswith("var(") and scope != ":root" else scope)
    m = re.fullmatch(r"([\d.]+)px", value)
    assert m, f"not a px length: {value}"
    return float(m.group(1))


def _body_padding(rules):
    padding = _decl(rules, "body", "padding").split()
    horizontal = padding[1] if len(padding) > 1 else padding[0]
    return 2 * _px(rules, horizontal)


def test_every_method_in_table_and_grid(tmp_path):
    tables = _tables(_page(tmp_path))
    grid = next(t for c, t in tables.items() if "grid" in c)
    scores = tables["scores"]
    assert "by-method" in grid["class"]  # 29 methods, 3 photos: methods are rows
    assert [h.split()[0] for h in grid["rowheads"]] == NAMES  # one row per method, in order
    assert grid["src"].count("map.png") == len(NAMES) * len(PHOTOS) - 1  # one failed cell
    assert "it broke" in "".join(grid["text"])
    assert [h.strip() for h in scores["rowheads"]] == NAMES
    # every map row has one cell per photo after its header
    body_rows = [r for r in grid["rows"] if r and r[0].get("scope") == "row"]
    assert all(len(r) == 1 + len(PHOTOS) for r in body_rows)


def test_few_methods_are_columns(tmp_path):
    tables = _tables(_page(tmp_path, methods=NAMES[:2]))
    grid = next(t for c, t in tables.items() if "grid" in c)
    assert "by-image" in grid["class"]
    assert [h.split()[0] for h in grid["rowheads"]] == PHOTOS
    assert "structured_attention_graph" not in "".join(grid["text"])
    tables = _tables(_page(tmp_path, layout="images"))
    grid = next(t for c, t in tables.items() if "grid" in c)
    assert "by-image" in grid["class"] and all(n in "".join(grid["text"]) for n in NAMES)


def test_table_cells_cannot_overlap(tmp_path):
    """Score cells and method names never wrap or shrink under their content: the whole table scrolls."""
    html = _page(tmp_path)
    rules = _css(html)
    for selector in ("table.scores th", "table.scores td"):
        assert _decl(rules, selector, "white-space") == "nowrap", selector
    # the row header (long method names) has no max-width that its text could overflow
    assert _decl(rules, "table.scores tbody th", "max-width") in (None, "none")
    assert _px(rules, _decl(rules, "table.scores td", "padding").split()[1]) >= 8  # a gap between columns
    assert re.search(r'<div class="scroll">\s*<table class="scores">', html)  # scrolls instead of squeezing


def test_grid_is_horizontally_compact(tmp_path):
    """At 1400 px: >= 12 method columns fit beside the photo column (methods as columns), and with methods
    as rows the maps of 5 photos fit without horizontal scrolling (the width a row of maps takes follows
    from the style: body padding + row header + cells of thumbnail + padding)."""
    html = _page(tmp_path)
    rules = _css(html)
    assert _decl(rules, "table.grid img", "width") == "var(--thumb)"
    assert _decl(rules, "table.grid img", "height") == "var(--thumb)"
    pad = _px(rules, _decl(rules, "table.grid td", "padding"))
    thumb = _px(rules, "var(--thumb)")
    rowhead = _px(rules, _decl(rules, "table.grid tbody th", "width"))
    column = thumb + 2 * pad
    # the method column header is held to the thumbnail's width (long names wrap inside it)
    assert _px(rules, _decl(rules, "table.grid.by-image thead th.method", "max-width")) <= column
    assert _decl(rules, "table.grid.by-image thead th.method", "overflow-wrap") == "anywhere"
    fit = (WINDOW - _body_padding(rules) - (rowhead + 2 * pad)) // column
    assert fit >= 12, f"only {fit} method columns fit in {WINDOW} px"
    # methods as rows: a larger thumbnail, still 5 photos (all bundled ones) wide within the window
    thumb_rows = _px(rules, _decl(rules, "table.grid.by-method", "--thumb"))
    assert thumb_rows >= thumb
    methodhead = _px(rules, _decl(rules, "table.grid.by-method tbody th", "width"))
    assert _body_padding(rules) + methodhead + 2 * pad + 5 * (thumb_rows + 2 * pad) <= WINDOW
    # a thumbnail grows on hover and links to the full-size map
    zoom = _decl(rules, "a.thumb:hover img", "transform")
    assert zoom == "scale(var(--zoom))" and float(_decl(rules, ":root", "--zoom")) * thumb >= 180
    assert html.count('<a class="thumb" href="map.png"') == len(NAMES) * len(PHOTOS) - 1


def test_page_is_self_contained(tmp_path):
    html = _page(tmp_path)
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_rendered_layout(tmp_path):
    """With WeasyPrint, lay the page out 1400 px wide: no score cell's text passes its cell's right edge,
    and 12 method columns end within the window."""
    weasyprint = pytest.importorskip("weasyprint")
    page = weasyprint.CSS(string=f"@page {{ size: {WINDOW}px 20000px; margin: 0 }}")

    def boxes(html):
        """Every layout box with the classes of its ancestor elements."""
        doc = weasyprint.HTML(string=html, base_url=str(tmp_path)).render(stylesheets=[page])
        out, todo = [], [(doc.pages[0]._page_box, "")]
        while todo:
            box, classes = todo.pop()
            out.append((box, classes))
            element = getattr(box, "element", None)
            inner = classes + " " + (element.get("class") or "") if element is not None else classes
            todo.extend((child, inner) for child in getattr(box, "children", None) or [])
        return out

    def right(box):
        return box.position_x + box.margin_width()

    def descendants(box):
        todo, out = list(getattr(box, "children", None) or []), []
        while todo:
            b = todo.pop()
            out.append(b)
            todo.extend(getattr(b, "children", None) or [])
        return out

    cells = [b for b, classes in boxes(_page(tmp_path))
             if getattr(b, "element_tag", None) in ("td", "th") and "scores" in classes.split()]
    assert len(cells) > 2 * len(NAMES)
    for cell in cells:
        edge = cell.position_x + cell.padding_left + cell.width + cell.padding_right
        for child in descendants(cell):
            if type(child).__name__ == "TextBox":
                assert child.position_x + child.width <= edge + 0.5, child.text

    columns = [b for b, _ in boxes(_page(tmp_path, methods=NAMES[:12], photos=PHOTOS * 4))
               if getattr(b, "element_tag", None) == "th" and "method" in (b.element.get("class") or "")]
    assert len(columns) == 12
    assert max(right(b) for b in columns) <= WINDOW
