"""Item titles for the page at ``/ui``, read from the dataset's item file when there is one.

Two formats are read: MovieLens' ``u.item`` (``id|title|release date|...``, latin-1) and a RecBole
atomic ``.item`` file (tab-separated, UTF-8, a ``name:type`` header such as
``item_id:token	movie_title:token_seq	release_year:token	class:token_seq``). Without a file, or with one
that cannot be read (a warning is logged), the page shows item ids.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

TITLE_COLUMNS = ("movie_title", "title", "name", "item_name")


def find_titles_file(data_dir: Path, dataset: str) -> Path | None:
    """The dataset's item file under ``data_dir``, RecBole's before MovieLens' own; None if neither."""
    for candidate in (data_dir / dataset / f"{dataset}.item", data_dir / dataset / "u.item"):
        if candidate.is_file():
            return candidate
    return None


def parse_u_item(text: str) -> dict[str, str]:
    """MovieLens ``u.item`` rows → {item id: title}; rows without both fields are skipped."""
    titles: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) >= 2 and fields[0].strip() and fields[1].strip():
            titles[fields[0].strip()] = fields[1].strip()
    return titles


def _column(names: list[str], wanted: tuple[str, ...]) -> int | None:
    for want in wanted:
        if want in names:
            return names.index(want)
    return None


def parse_recbole_item(text: str) -> dict[str, str]:
    """A RecBole ``.item`` file → {item id: title (year)}; ValueError when the header has no item id or
    title column."""
    lines = text.splitlines()
    if not lines:
        return {}
    names = [field.split(":", 1)[0].strip() for field in lines[0].split("\t")]
    id_col, title_col = _column(names, ("item_id",)), _column(names, TITLE_COLUMNS)
    if id_col is None or title_col is None:
        raise ValueError(f"header {lines[0]!r} names no item_id and title columns")
    year_col = _column(names, ("release_year", "year"))
    titles: dict[str, str] = {}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) <= max(id_col, title_col):
            continue
        if not fields[id_col].strip() or not fields[title_col].strip():
            continue
        title = fields[title_col].strip()
        if year_col is not None and year_col < len(fields) and fields[year_col].strip():
            title = f"{title} ({fields[year_col].strip()})"
        titles[fields[id_col].strip()] = title
    return titles


def read_titles(path: Path) -> dict[str, str]:
    """Titles from ``path`` in either format; ValueError or OSError when it cannot be read."""
    raw = path.read_bytes()
    if b"\t" in raw.split(b"\n", 1)[0] and b":" in raw.split(b"\n", 1)[0]:
        return parse_recbole_item(raw.decode("utf-8"))
    return parse_u_item(raw.decode("latin-1"))


def load_titles(item_titles: Path | None, data_dir: Path | None, dataset: str) -> dict[str, str]:
    """The titles the settings point at (``item_titles``, else the dataset's file under ``data_dir``);
    {} when there is none or it cannot be read."""
    path = item_titles
    if path is None and data_dir is not None and dataset:
        path = find_titles_file(data_dir, dataset)
    if path is None:
        return {}
    try:
        titles = read_titles(path)
    except (OSError, ValueError) as exc:
        log.warning("item titles not read from %s: %s", path, exc)
        return {}
    log.info("item titles: %d from %s", len(titles), path)
    return titles
