"""The quickstart's MovieLens-100k download, against a local GroupLens-format fixture (no network)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from model.data import load_dataset
from service.movielens import ensure_ml100k, main

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n186\t242\t5\t881250000\n"


def _zip(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", text)
        zf.writestr("ml-100k/README", "MovieLens")
    return path.as_uri()


def test_download_converts_u_data_to_a_loadable_inter_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    path = ensure_ml100k(data_dir, _zip(tmp_path, U_DATA))
    assert path == data_dir / "ml-100k" / "ml-100k.inter"
    data = load_dataset("ml-100k", data_dir)
    assert data.n_users == 2 and data.vocab.n_items == 3 and data.n_interactions == 4
    assert data.vocab.users == ["196", "186"]
    # A present file is never downloaded again (the URL would fail).
    assert ensure_ml100k(data_dir, (tmp_path / "missing.zip").as_uri()) == path


def test_malformed_download_writes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="u.data:2"):
        ensure_ml100k(data_dir, _zip(tmp_path, "1\t2\t3\t4\nbroken line\n"))
    assert not (data_dir / "ml-100k").exists()
    assert main(["--data-dir", str(data_dir), "--url", (tmp_path / "missing.zip").as_uri()]) == 2
