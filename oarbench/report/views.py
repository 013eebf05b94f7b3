"""What the templates receive: tables as rows of cells, figures with captions, CSV downloads.

Plain data only; the templates (``templates/``, Jinja2 with autoescape on) turn them
into HTML, so every text from a table is escaped on the way out.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from oarbench.report.data import _fmt_cell
from oarbench.report.data import fmt as fmt  # the one number format of the report
from oarbench.report.figures import Drawn

__all__ = ["Cell", "TableView", "CsvLink", "FigureView", "table_view", "csv_link", "text_columns", "figure_view"]


@dataclass(frozen=True)
class Cell:
    """One table cell: text, CSS class (``t`` text, ``sig`` marked) and an optional second, smaller line."""

    text: str
    cls: str = ""
    sub: str = ""


@dataclass(frozen=True)
class CsvLink:
    """A download of a table as CSV carried in the page itself (``data:`` URI)."""

    filename: str
    href: str
    rows: int


@dataclass(frozen=True)
class TableView:
    columns: list[Cell]
    rows: list[list[Cell]]
    csv: CsvLink | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class FigureView:
    """A numbered figure: image, print width, caption (what is drawn and n)."""

    number: int
    uri: str
    width_in: float
    alt: str
    caption: str
    id: str = ""
    title: str = ""
    extra: list[str] = field(default_factory=list)


def text_columns(df: pd.DataFrame) -> list[str]:
    """Columns shown left-aligned: everything that is not numeric (object, str, bool)."""
    return [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]


def csv_link(df: pd.DataFrame, filename: str) -> CsvLink:
    from oarbench.tables import csv_text

    data = base64.b64encode(csv_text(df).encode("utf-8")).decode("ascii")
    return CsvLink(filename, "data:text/csv;charset=utf-8;base64," + data, len(df))


def table_view(df: pd.DataFrame, *, text_cols: Iterable[str] | None = None,
               marks: Mapping[tuple[int, str], bool] | None = None, csv: str | None = None,
               full: pd.DataFrame | None = None, subs: Mapping[tuple[int, str], str] | None = None) -> TableView:
    """A table of ``df`` (index dropped): text columns left-aligned, marked cells bold with `` *``.

    ``csv``: the name of a CSV download of ``full`` (default ``df``) shown with it.
    """
    df = df.reset_index(drop=True)
    tcols = set(text_columns(df) if text_cols is None else text_cols)
    cols = list(df.columns)
    head = [Cell(str(c), "t" if c in tcols else "") for c in cols]
    numeric = (int, float, np.integer, np.floating)
    rows = []
    for i, values in enumerate(df.itertuples(index=False, name=None)):
        row = []
        for c, val in zip(cols, values):
            txt = _fmt_cell(val)
            is_text = c in tcols or not isinstance(val, numeric) or isinstance(val, (bool, np.bool_))
            cls = "t" if is_text else ""
            if marks and marks.get((i, c)):
                cls = (cls + " sig").strip()
                txt += " *"
            row.append(Cell(txt, cls, (subs or {}).get((i, c), "")))
        rows.append(row)
    return TableView(head, rows, csv_link(df if full is None else full, csv) if csv else None)


def figure_view(drawn: Drawn | None, number: int, alt: str, caption: str, *, id: str = "", title: str = "") -> FigureView | None:
    if drawn is None:
        return None
    if drawn.note:
        caption = caption.rstrip(".") + f"; {drawn.note}."
    return FigureView(number, drawn.uri, round(drawn.width_in, 2), alt, caption, id, title)


def join(items: Sequence[str], sep: str = ", ") -> str:
    return sep.join(str(i) for i in items)
