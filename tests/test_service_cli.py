"""``memrec serve``: settings errors stop it with a message; ``memrec train`` loads no web or Redis code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main


def test_serve_without_a_model_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "holds no config.json" in caplog.text


def test_the_training_command_loads_no_web_or_redis_code() -> None:
    loaded = "set(sys.modules)"
    code = f"import sys, service.cli; bad = {{'fastapi', 'redis', 'memory_store'}} & {loaded}; assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_settings_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("MEMREC_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("MEMREC_MAX_EVENTS_PER_BATCH", "7")
    monkeypatch.setenv("MEMREC_FROZEN_MEMORY", "true")
    s = Settings()  # type: ignore[call-arg]
    assert s.model_dir == tmp_path and s.max_events_per_batch == 7 and s.frozen_memory
    assert s.store_namespace("ml-100k-abc/1") == "ml-100k-abc_1"
    monkeypatch.setenv("MEMREC_WORKERS", "2")
    with pytest.raises(ValueError, match="workers > 1 needs redis_url"):
        Settings()  # type: ignore[call-arg]
    monkeypatch.setenv("MEMREC_REDIS_URL", "redis://127.0.0.1:6379/11")
    assert Settings().workers == 2  # type: ignore[call-arg]
    monkeypatch.setenv("MEMREC_NAMESPACE", "bad name!")
    with pytest.raises(ValueError, match="namespace must be"):
        Settings()  # type: ignore[call-arg]
