"""Fetch MovieLens-100k from GroupLens for the quickstart (``make run``) when no copy is present.

GroupLens ships ``ml-100k.zip`` whose ``ml-100k/u.data`` holds ``user<TAB>item<TAB>rating<TAB>timestamp``
rows; the model reads the RecBole atomic file ``ml-100k/ml-100k.inter`` (the same columns with a typed
header), so the download is converted once.

Offline, either file can be put in ``DATA_DIR/ml-100k/`` by hand: ``ml-100k.inter`` is used as it is,
and ``u.data`` (where unzipping ``ml-100k.zip`` in ``DATA_DIR`` leaves it) is converted like a download.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
U_DATA = "ml-100k/u.data"


INTER_NAME = "ml-100k.inter"
U_DATA_NAME = "u.data"


class MovieLensUnavailable(RuntimeError):
    """No local copy and the download failed; the message says which file to put where."""


def dataset_dir(data_dir: Path) -> Path:
    return data_dir / "ml-100k"


def inter_path(data_dir: Path) -> Path:
    return dataset_dir(data_dir) / INTER_NAME


def u_data_path(data_dir: Path) -> Path:
    return dataset_dir(data_dir) / U_DATA_NAME


def convert_u_data(raw: str) -> str:
    """GroupLens ``u.data`` text → RecBole ``.inter`` text; ValueError names a malformed line."""
    out = [INTER_HEADER]
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4 or not all(f.strip() for f in fields):
            raise ValueError(f"{U_DATA}:{lineno}: expected user, item, rating, timestamp separated by tabs")
        out.append("\t".join(f.strip() for f in fields) + "\n")
    if len(out) == 1:
        raise ValueError(f"{U_DATA}: no interactions")
    return "".join(out)


def unavailable_message(data_dir: Path, url: str, reason: object) -> str:
    """What to do without the network: the folder looked in and the file names it accepts."""
    folder = dataset_dir(data_dir).resolve()
    return (
        f"could not download MovieLens-100k from {url} ({reason}). Without network access, put one of "
        f"these files in {folder}/ and run again: {INTER_NAME} (the RecBole atomic file), or "
        f"{U_DATA_NAME} from that zip (tab-separated user, item, rating, timestamp; unzipping "
        f"ml-100k.zip in {data_dir.resolve()}/ puts it there), which is converted to {INTER_NAME}"
    )


def _write_inter(target: Path, raw: str) -> Path:
    """Convert ``u.data`` text and write it to ``target`` atomically (nothing written if malformed)."""
    text = convert_u_data(raw)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    log.info("wrote %s (%d interactions)", target, text.count("\n") - 1)
    return target


def _download_u_data(data_dir: Path, url: str, timeout_s: float) -> str:
    log.info("downloading MovieLens-100k from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # http(s), or file: in tests
            payload = resp.read()
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            return zf.read(U_DATA).decode("utf-8")
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise MovieLensUnavailable(unavailable_message(data_dir, url, exc)) from exc


def ensure_ml100k(data_dir: Path, url: str = GROUPLENS_URL, timeout_s: float = 60.0) -> Path:
    """The path of ``ml-100k.inter`` under ``data_dir``: present, converted from a local ``u.data``, or
    downloaded and converted. MovieLensUnavailable when none works; ValueError for a malformed u.data."""
    target = inter_path(data_dir)
    if target.is_file():
        return target
    local = u_data_path(data_dir)
    if local.is_file():
        log.info("converting %s", local)
        return _write_inter(target, local.read_text(encoding="utf-8"))
    return _write_inter(target, _download_u_data(data_dir, url, timeout_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="download MovieLens-100k into DATA_DIR if it is missing")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--url", default=GROUPLENS_URL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ensure_ml100k(args.data_dir, args.url)
    except (MovieLensUnavailable, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
