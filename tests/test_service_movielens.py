"""The quickstart's MovieLens-100k download, against a local GroupLens-format fixture (no network)."""

from __future__ import annotations

import logging
import socket
import zipfile
from pathlib import Path

import pytest

from model.data import load_dataset
from service.movielens import MovieLensUnavailable, ensure_ml100k, main

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


def test_a_local_u_data_is_converted_without_the_network(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "ml-100k").mkdir(parents=True)
    (data_dir / "ml-100k" / "u.data").write_text(U_DATA, encoding="utf-8")
    unreachable = (tmp_path / "missing.zip").as_uri()  # a download would fail
    path = ensure_ml100k(data_dir, unreachable)
    assert path == data_dir / "ml-100k" / "ml-100k.inter"
    data = load_dataset("ml-100k", data_dir)
    assert data.n_users == 2 and data.vocab.n_items == 3 and data.n_interactions == 4
    assert main(["--data-dir", str(data_dir), "--url", unreachable]) == 0


def _unreachable_url() -> str:
    """An http URL on a loopback port nothing listens on: the connection is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


def test_offline_without_a_copy_says_which_file_to_put_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    url = _unreachable_url()
    with pytest.raises(MovieLensUnavailable) as info:
        ensure_ml100k(data_dir, url, timeout_s=5.0)
    message = str(info.value)
    folder = (data_dir / "ml-100k").resolve()
    assert f"put one of these files in {folder}/" in message
    assert "ml-100k.inter (the RecBole atomic file)" in message
    assert "u.data from that zip (tab-separated user, item, rating, timestamp" in message
    assert url in message
    assert not (data_dir / "ml-100k").exists()
    with caplog.at_level(logging.ERROR, logger="service.movielens"):
        assert main(["--data-dir", str(data_dir), "--url", url]) == 2
    assert f"put one of these files in {folder}/" in caplog.text
