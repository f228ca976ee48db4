"""Fetch MovieLens-100k from GroupLens for the quickstart (``make run``) when no copy is present.

GroupLens ships ``ml-100k.zip`` whose ``ml-100k/u.data`` holds ``user<TAB>item<TAB>rating<TAB>timestamp``
rows; the model reads the RecBole atomic file ``ml-100k/ml-100k.inter`` (the same columns with a typed
header), so the download is converted once.
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


def inter_path(data_dir: Path) -> Path:
    return data_dir / "ml-100k" / "ml-100k.inter"


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


def ensure_ml100k(data_dir: Path, url: str = GROUPLENS_URL, timeout_s: float = 60.0) -> Path:
    """The path of ``ml-100k.inter`` under ``data_dir``, downloading and converting it if missing."""
    target = inter_path(data_dir)
    if target.is_file():
        return target
    log.info("downloading MovieLens-100k from %s", url)
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # http(s), or file: in tests
        payload = resp.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        raw = zf.read(U_DATA).decode("utf-8")
    text = convert_u_data(raw)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    log.info("wrote %s (%d interactions)", target, text.count("\n") - 1)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="download MovieLens-100k into DATA_DIR if it is missing")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--url", default=GROUPLENS_URL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ensure_ml100k(args.data_dir, args.url)
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        log.error("could not get MovieLens-100k: %s (put ml-100k/ml-100k.inter under %s)", exc, args.data_dir)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
