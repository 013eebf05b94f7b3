"""The results table on disk: ``metrics.csv`` and ``metrics.parquet``.

``metrics.parquet`` is a Hive-partitioned Parquet dataset
(``centre=A/model=M/condition=original/part-0.parquet``), written by pyarrow
(to a URL through fsspec), so that a consortium-sized table can be read one
centre, model or condition at a time (``pyarrow.dataset``, Dask, Spark, DuckDB). It holds the
same rows and values as ``metrics.csv``; :func:`read_table` reads either into
the same DataFrame (same columns, order, dtypes and values).

The grouping keys ``study, centre, model, condition, case, structure`` are
never NaN and never empty: statistics, galleries and the report group by them,
and pandas drops NaN group keys silently, so a table with an empty key would
lose rows downstream without a word. Writers refuse such a table
(:func:`check_keys`); :func:`read_table` reads the keys as text (a model named
``NA`` or a centre named ``None`` stays a name) and refuses empty ones.

A local path needs only the core dependencies; a URL needs fsspec (the
``remote`` or ``s3`` extra, :mod:`oarbench.storage`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd  # imported where used (oarbench.evaluate imports this module before its pool forks)

from oarbench import storage
from oarbench.metrics import RESULT_COLUMNS

__all__ = ["TABLE_COLUMNS", "PARTITION_COLUMNS", "PARQUET_INSTALL_HINT", "KEY_COLUMNS", "DEFAULT_STUDY", "DEFAULT_CENTRE",
           "DEFAULT_CONDITION", "check_keys", "have_pyarrow", "write_parquet", "read_table",
           "csv_cell", "csv_row", "csv_text", "restore_cell", "restore_cells"]

#: Columns that address a row; each must be a non-empty string in every row.
KEY_COLUMNS: tuple[str, ...] = ("study", "centre", "model", "condition", "case", "structure")
#: Columns of the results table (``metrics.csv``), in order.
TABLE_COLUMNS: tuple[str, ...] = ("study", "centre", "model", "condition", "case", "patient") + RESULT_COLUMNS
#: Names given to a plain --reference/--prediction folder pair when none are given.
DEFAULT_STUDY = "own-data"
DEFAULT_CENTRE = "all"
DEFAULT_CONDITION = "original"
# What pandas reads as NaN in a numeric column (our writers leave NaN empty); key columns get none.
_NUMERIC_NA = ["", "nan", "NaN", "NA", "N/A", "null", "None"]


def check_keys(table: pd.DataFrame, source: str, columns: Sequence[str] = KEY_COLUMNS) -> None:
    """Raise ValueError when a key column present in ``table`` has an empty or NaN value.

    The message names ``source``, the column, how many rows and the first row
    number (0-based, as in the DataFrame), and how to fix it.
    """
    for col in columns:
        if col not in table.columns:
            continue
        values = table[col]
        bad = values.isna() | (values.astype(str).str.strip() == "")
        if bad.any():
            first = int(bad.to_numpy().nonzero()[0][0])
            raise ValueError(
                f"{source}: {int(bad.sum())} row(s) with an empty '{col}' (first: row {first}); every row needs "
                f"{', '.join(KEY_COLUMNS)} (re-run `oarbench evaluate` with --study-name/--centre/--model/--condition)"
            )

# --- spreadsheet formulas in CSV cells ------------------------------------------------------------
# A spreadsheet opening a CSV file runs a cell that starts with = + - @ (or a tab or carriage return
# before one) as a formula (OWASP, "CSV Injection"). Every CSV oarbench writes goes through
# csv_text / csv_row, which put a single quote before such a text cell; restore_cell undoes it when
# oarbench reads its own tables back, so names survive the round trip exactly.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_cell(value: Any) -> Any:
    """``value`` safe to put in a CSV cell that a spreadsheet opens.

    A text that starts with ``= + - @``, a tab, a carriage return or a line feed,
    optionally after single quotes, gets one more single quote in front
    (``=HYPERLINK("x")`` -> ``'=HYPERLINK("x")``); a text that is a plain number
    (``-2.5``) and anything that is not text are returned unchanged.
    :func:`restore_cell` is the exact inverse.
    """
    if not isinstance(value, str):
        return value
    body = value.lstrip("'")
    if body.startswith(_FORMULA_START) and not (body == value and _is_number(value)):
        return "'" + value
    return value


def restore_cell(value: Any) -> Any:
    """The text :func:`csv_cell` was given (one leading quote removed where it added one)."""
    if isinstance(value, str) and value.startswith("'"):
        body = value.lstrip("'")
        if body.startswith(_FORMULA_START):
            return value[1:]
    return value


def restore_cells(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (read from a CSV oarbench wrote) with every text cell passed through :func:`restore_cell`."""
    for col in df.columns:
        if _is_text(df[col]):
            df[col] = _map_cells(df[col], restore_cell)
    return df


def _map_cells(values: pd.Series, fn: Any) -> pd.Series:
    """``values`` with ``fn`` applied to each distinct text (a few names in a long table: fast)."""
    import pandas as pd

    original = values
    values = values.astype(object)
    changed = {}
    for value in pd.unique(values):
        if isinstance(value, str):
            new = fn(value)
            if new != value:
                changed[value] = new
    if not changed:
        return original
    out = values.map(changed).where(values.isin(list(changed)), values)
    return out.astype(original.dtype) if isinstance(original.dtype, pd.StringDtype) else out


def _is_text(values: pd.Series) -> bool:
    import pandas as pd

    return values.dtype == object or isinstance(values.dtype, (pd.StringDtype, pd.CategoricalDtype))


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row for :class:`csv.DictWriter` with every cell passed through :func:`csv_cell`."""
    return {key: csv_cell(value) for key, value in row.items()}


def csv_text(df: pd.DataFrame, **to_csv: Any) -> str:
    """``df.to_csv(index=False, **to_csv)`` with every text cell and column name passed through :func:`csv_cell`."""
    safe = df.copy()
    for col in safe.columns:
        if _is_text(safe[col]):
            safe[col] = _map_cells(safe[col], csv_cell)
    safe.columns = [csv_cell(c) for c in safe.columns]
    to_csv.setdefault("index", False)
    return safe.to_csv(**to_csv)


#: Partition columns of ``metrics.parquet``, outermost first.
PARTITION_COLUMNS = ("centre", "model", "condition")
PARQUET_INSTALL_HINT = "metrics.parquet needs pyarrow: pip install 'oarbench[parquet]'"
# Row order of the table is kept in a column of the files (partitioning reorders rows).
_ORDER = "_row"
# An empty centre/model (folder mode) is stored as this partition value, never as a null.
_EMPTY = "_"


def have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.dataset  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(PARQUET_INSTALL_HINT) from None
    return pyarrow


def _fs(url: str) -> tuple[Any, str]:
    """fsspec file system and path of a URL (never called for a local path)."""
    return storage._fs(url)


def write_parquet(table: pd.DataFrame, url: str | Path, partition_cols: Sequence[str] = PARTITION_COLUMNS) -> str:
    """Write ``table`` as a partitioned Parquet dataset at ``url`` (a folder; local path or fsspec URL).

    The dataset is written to a temporary folder beside ``url`` and moved into
    place, replacing an older dataset, so that readers never see half of it.
    """
    pa = _pyarrow()
    import pyarrow.parquet as pq

    for col in partition_cols:
        if col not in table.columns:
            raise ValueError(f"{url}: the table has no column {col!r} to partition by")
    t = table.copy()
    t[_ORDER] = range(len(t))
    for col in partition_cols:
        values = t[col].astype(str)
        if (values == _EMPTY).any():
            raise ValueError(f"{url}: {col} value {_EMPTY!r} is reserved for an empty {col}")
        t[col] = values.where(values != "", _EMPTY)
    arrow = pa.Table.from_pandas(t, preserve_index=False)

    def write(target: str, fs: Any = None) -> None:
        pq.write_to_dataset(arrow, target, partition_cols=list(partition_cols), filesystem=fs,
                            basename_template="part-{i}.parquet", existing_data_behavior="overwrite_or_ignore")

    loc = storage.as_location(url)
    if not isinstance(loc, Path):
        # An object store has no folder to rename: replace the old objects by the new ones.
        fs, path = _fs(loc)
        path = path.rstrip("/")
        if fs.exists(path):
            fs.rm(path, recursive=True)
        write(path, fs)
        return str(url)
    tmp = loc.parent / f".{loc.name}.partial-{uuid.uuid4().hex[:8]}"
    old = loc.parent / f".{loc.name}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(str(tmp))
        if loc.exists():
            os.replace(loc, old)
        os.replace(tmp, loc)
    finally:
        for leftover in (tmp, old):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            elif leftover.exists() or leftover.is_symlink():
                leftover.unlink()
    return str(url)


def _read_parquet(url: str | Path, columns: Sequence[str] | None) -> pd.DataFrame:
    pa = _pyarrow()
    import pyarrow.dataset as ds

    loc = storage.as_location(url)
    fs, path = (None, str(loc)) if isinstance(loc, Path) else _fs(loc)
    if not (loc.exists() if isinstance(loc, Path) else fs.exists(path)):
        raise FileNotFoundError(f"{url}: results table not found")
    try:
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        arrow = dataset.to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{url}: cannot read the results table as Parquet ({exc})") from exc
    df = arrow.to_pandas()
    partition = [f.name for f in dataset.partitioning.schema] if dataset.partitioning is not None else []
    for col in partition:
        df[col] = df[col].astype(str).where(df[col].astype(str) != _EMPTY, "")
    if _ORDER in df.columns:
        df = df.sort_values(_ORDER, kind="stable").drop(columns=_ORDER)
    order = [c for c in (columns or ()) if c in df.columns]
    order += [c for c in df.columns if c not in order]
    return _text_keys(df[order].reset_index(drop=True))


def read_table(url: str | Path, *, columns: Sequence[str] | None = None, what: str = "results table",
               required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a results table: a CSV file or a ``.parquet`` dataset (folder), local or fsspec URL.

    ``columns``: the preferred column order for a Parquet dataset (its
    partition columns are read back last otherwise); the default is the order
    of the results table (:data:`TABLE_COLUMNS`). Key columns
    are read as text; ``inf`` is infinity, an empty cell NaN. Raises
    ValueError naming ``url`` when it is unreadable, lacks a ``required``
    column, has an empty key (:func:`check_keys`) or (a local file) does not
    match the sha256 its run record names (:func:`oarbench.io.check_output_set`).
    """
    import pandas as pd

    text = str(url).rstrip("/")
    if "://" not in text:
        from oarbench.io import check_output_set  # the tables of one run, not a mixed set

        check_output_set(url)
    if text.endswith(".parquet"):
        df = _read_parquet(url, TABLE_COLUMNS if columns is None else columns)
    else:
        loc = storage.as_location(url)
        if not storage.is_file(loc):
            raise FileNotFoundError(f"{url}: {what} not found")
        try:
            with _open(loc) as fh:
                header = pd.read_csv(fh, nrows=0)
            text = [c for c in header.columns if c in KEY_COLUMNS or c in ("patient", "status")]
            na = {c: _NUMERIC_NA for c in header.columns if c not in KEY_COLUMNS}
            with _open(loc) as fh:
                df = pd.read_csv(fh, dtype={c: str for c in text}, keep_default_na=False, na_values=na)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"{url}: cannot read the {what} as CSV ({exc})") from exc
        df = restore_cells(_text_keys(df))
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{url}: missing required column(s) {', '.join(missing)}; have {', '.join(map(str, df.columns))}")
    check_keys(df, str(url))
    return df


def _open(loc: storage.Location) -> Any:
    """A binary file object: a local file opened directly, a URL through fsspec."""
    if isinstance(loc, Path):
        return open(loc, "rb")
    fs, path = _fs(loc)
    return fs.open(path, "rb")


#: Text columns of the results table: an empty cell is the empty string, never NaN.
_TEXT = ("study", "centre", "model", "condition", "case", "structure", "status")


def _text_keys(df: pd.DataFrame) -> pd.DataFrame:
    for col in _TEXT:
        if col in df.columns:
            df[col] = df[col].where(df[col].notna(), "").astype(str)
    return df
