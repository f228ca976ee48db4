"""Deployment files: the compose stack validated by docker-compose, the Dockerfile's and the Grafana
dashboard's wiring checked against the service, and the container entrypoint run outside Docker
against a private, password-protected Redis the way compose runs it (train, then serve).

No Docker engine is needed. ``docker-compose config`` validates and resolves the compose file; the
tests skip without it unless ``MEMREC_REQUIRE_VALIDATORS=1`` (CI sets it and installs the validator).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import RedisServer, free_port
from test_service_support import write_toy_dataset

from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
# Variables the entrypoint reads besides the service's settings.
ENTRYPOINT_VARS = {
    "MEMREC_DATASET",
    "MEMREC_DATA_DIR",
    "MEMREC_TRAIN_ARGS",
    "MEMREC_TRAIN_IF_MISSING",
    "MEMREC_RETRAIN_ARGS",
    "MEMREC_KEEP_VERSIONS",
    "MEMREC_BIN",
}
SETTINGS_VARS = {f"MEMREC_{name.upper()}" for name in Settings.model_fields}


def known_variable(name: str) -> bool:
    return name in SETTINGS_VARS or name in ENTRYPOINT_VARS


# ------------------------------------------------------------------------------------- compose


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = compose_command()
    if cmd is None:
        if os.environ.get("MEMREC_REQUIRE_VALIDATORS") == "1":
            pytest.fail("docker-compose is required here (MEMREC_REQUIRE_VALIDATORS=1)")
        pytest.skip("docker-compose not installed")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MEMREC_", "API_", "REDIS_"))}
    return subprocess.run(
        [*cmd, "-f", str(path), "config"],
        cwd=path.parent,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """The compose file as docker-compose resolves it, with two API replicas and a set password."""
    res = compose_config(ROOT / "docker-compose.yml", {"API_REPLICAS": "2", "REDIS_PASSWORD": "pw-123"})
    assert res.returncode == 0, res.stderr
    resolved: dict[str, Any] = yaml.safe_load(res.stdout)
    return resolved


@pytest.fixture(scope="module")
def retrain_stack() -> dict[str, Any]:
    """The compose file resolved with the ``retrain`` profile active."""
    res = compose_config(
        ROOT / "docker-compose.yml", {"COMPOSE_PROFILES": "retrain", "REDIS_PASSWORD": "pw-123"}
    )
    assert res.returncode == 0, res.stderr
    resolved: dict[str, Any] = yaml.safe_load(res.stdout)
    return resolved


def test_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n  api:\n    image: x\n    depends_on:\n      redis:\n        condition: soon\n"
    )
    res = compose_config(broken, {})
    assert res.returncode != 0 and "condition" in res.stderr


def test_compose_services_are_wired(stack: dict[str, Any]) -> None:
    svc = stack["services"]
    # docker-compose 1.x lists the services of inactive profiles too (retrain), compose 2 does not
    assert set(svc) - {"retrain"} == {"redis", "train", "api", "proxy", "prometheus", "grafana"}
    api, train, redis = svc["api"], svc["train"], svc["redis"]
    # Redis: AOF on a named volume, password, a healthcheck the API waits on.
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes" and cmd[cmd.index("--dir") + 1] == "/data"
    assert cmd[cmd.index("--requirepass") + 1] == "pw-123"
    assert any(
        v.startswith("redis-data:/data") or _vol(v) == ("redis-data", "/data") for v in redis["volumes"]
    )
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    # Training runs once before the API; the API needs healthy Redis and completed training.
    assert train["command"] == ["train"] and train["restart"] == "no"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert api["deploy"]["replicas"] == 2  # API_REPLICAS
    assert api["command"] == ["serve"] and api["image"] == train["image"]
    assert (ROOT / api["build"]["dockerfile"]).is_file()
    # One env for both; every MEMREC_* name is a setting or an entrypoint variable.
    env = api["environment"]
    assert env == train["environment"]
    unknown = [name for name in env if name.startswith("MEMREC_") and not known_variable(name)]
    assert not unknown, f"not settings of the service: {unknown}"
    url = httpx.URL(env["MEMREC_REDIS_URL"])
    assert url.host == "redis" and url.port == 6379 and env["MEMREC_REDIS_PASSWORD"] == "pw-123"
    # The model volume: written by training, read-only for the API, and holding MEMREC_MODEL_DIR.
    train_mounts = {_vol(v)[1]: v for v in train["volumes"]}
    api_mounts = {_vol(v)[1]: v for v in api["volumes"]}
    assert "/models" in train_mounts and "/models" in api_mounts and "/data" in train_mounts
    assert _read_only(api_mounts["/models"]) and not _read_only(train_mounts["/models"])
    assert env["MEMREC_MODEL_DIR"].startswith("/models/") and env["MEMREC_DATA_DIR"] == "/data"


def test_the_retrain_profile_runs_the_loop_against_the_served_store(retrain_stack: dict[str, Any]) -> None:
    svc = retrain_stack["services"]
    retrain, api = svc["retrain"], svc["api"]
    assert retrain["command"] == ["retrain"] and retrain["profiles"] == ["retrain"]
    assert retrain["restart"] == "no" and retrain["image"] == api["image"]
    assert retrain["depends_on"]["redis"]["condition"] == "service_healthy"
    env = retrain["environment"]
    assert {k: v for k, v in env.items() if k in api["environment"]} == api["environment"]
    assert all(known_variable(name) for name in env if name.startswith("MEMREC_"))
    assert "MEMREC_NAMESPACE" not in env  # the export reads the served version's own namespace
    mounts = {_vol(v)[1]: v for v in retrain["volumes"]}
    assert _vol(mounts["/models"])[0] == "models" and not _read_only(mounts["/models"])
    assert "/data" in mounts


def test_proxy_and_prometheus_reach_every_replica(stack: dict[str, Any]) -> None:
    svc = stack["services"]
    port = Settings.model_fields["port"].default
    assert [str(p) for p in svc["api"]["expose"]] == [str(port)]
    published = svc["proxy"]["ports"][0]
    target = published["target"] if isinstance(published, dict) else int(str(published).split(":")[-1])
    assert int(target) == port
    nginx = (DOCKER / "nginx.conf").read_text()
    assert f"listen {port};" in nginx and f"http://api:{port}" in nginx
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["api"] and job["dns_sd_configs"][0]["port"] == port
    mounts = [_vol(v) for v in svc["prometheus"]["volumes"]]
    assert (str(DOCKER / "prometheus.yml"), "/etc/prometheus/prometheus.yml") in mounts


def test_grafana_dashboard_uses_metrics_the_service_exports(stack: dict[str, Any]) -> None:
    mounts = dict(_vol(v) for v in stack["services"]["grafana"]["volumes"])
    assert mounts[str(DOCKER / "grafana" / "provisioning")] == "/etc/grafana/provisioning"
    dash_dir = mounts[str(DOCKER / "grafana" / "dashboards")]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/memrec.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dash_dir
    source = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid, url = source["datasources"][0]["uid"], source["datasources"][0]["url"]
    assert httpx.URL(url).host == "prometheus" and httpx.URL(url).port == 9090
    dashboard = json.loads((DOCKER / "grafana/dashboards/memrec.json").read_text())
    exported = Metrics().render().decode()
    names = set(re.findall(r"^# TYPE (\w+) (\w+)", exported, flags=re.M))
    series = {n for n, _ in names} | {
        n + s for n, t in names if t == "histogram" for s in ("_bucket", "_sum", "_count")
    }
    series |= {n + "_total" for n, t in names if t == "counter"}
    titles = []
    for panel in dashboard["panels"]:
        titles.append(panel["title"].lower())
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            used = set(re.findall(r"\bmemrec_\w+", target["expr"]))
            assert used and used <= series, f"{panel['title']}: {used - series} not exported"
    for topic in ("request rate", "p50", "p99", "error", "k", "memory bank", "ingest lag"):
        assert any(topic in t for t in titles), topic


def _vol(spec: Any) -> tuple[str, str]:
    """(source, target) of a short ``src:dst[:mode]`` string or a long-syntax mapping."""
    if isinstance(spec, dict):
        return str(spec.get("source", "")), str(spec["target"])
    parts = str(spec).split(":")
    return parts[0], parts[1]


def _read_only(spec: Any) -> bool:
    return bool(spec.get("read_only")) if isinstance(spec, dict) else str(spec).endswith(":ro")


# ------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_wiring() -> None:
    steps = dockerfile_instructions()
    stages = [arg for op, arg in steps if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: dependencies are built apart from the runtime image"
    runtime = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    ops = dict(runtime)
    # Dependencies come from pyproject.toml in a layer before any source is copied.
    first_copy_of_source = min(
        i for i, (op, arg) in enumerate(steps) if op == "COPY" and "model" in arg.split()
    )
    deps_install = max(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "requirements.txt" in arg)
    assert deps_install < first_copy_of_source
    assert "torch==" in " ".join(arg for _, arg in steps) or "^torch==" in (DOCKER / "Dockerfile").read_text()
    # Non-root user, the health check on /livez, the settings' port, the entrypoint script.
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert "/livez" in ops["HEALTHCHECK"]
    assert ops["EXPOSE"] == str(Settings.model_fields["port"].default)
    assert json.loads(ops["ENTRYPOINT"]) == ["memrec-entrypoint"] and json.loads(ops["CMD"]) == ["serve"]
    copies = [arg.split() for op, arg in runtime if op == "COPY" and not arg.startswith("--from")]
    assert ["docker/entrypoint.sh", "/usr/local/bin/memrec-entrypoint"] in copies
    packages = {c[0] for c in copies}
    assert {"model", "memory_store", "service"} <= packages
    for src in packages:
        assert (ROOT / src).exists(), src
    ignore = (ROOT / ".dockerignore").read_text().split()
    for src in packages | {"pyproject.toml"}:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"
    env_names = re.findall(r"\b(MEMREC_\w+)=", " ".join(arg for op, arg in runtime if op == "ENV"))
    assert env_names and all(known_variable(n) for n in env_names), env_names


# ------------------------------------------------------------------------------------ entrypoint


def _wrapper(tmp: Path) -> Path:
    """What the image's ``memrec`` command is: ``python -m service.cli`` with this checkout importable."""
    script = tmp / "memrec"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m service.cli "$@"\n')
    script.chmod(0o755)
    return script


def _run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_entrypoint_trains_once_then_serves(redis_server: Callable[..., RedisServer], tmp_path: Path) -> None:
    redis = redis_server("--requirepass", "pw-entry", "--appendonly", "yes")
    data = write_toy_dataset(tmp_path / "toy.txt")
    port = free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "MEMREC_BIN": str(_wrapper(tmp_path)),
        "MEMREC_DATASET": str(data),
        "MEMREC_DATA_DIR": str(tmp_path / "data"),
        "MEMREC_MODEL_DIR": str(tmp_path / "models" / "current"),
        "MEMREC_TRAIN_ARGS": "--epochs 2 --ft-epochs 1 --k 5 --threads 1 --device cpu",
        "MEMREC_REDIS_URL": redis.url,
        "MEMREC_REDIS_PASSWORD": "pw-entry",
        "MEMREC_STORE_DIR": str(tmp_path / "store"),
        "MEMREC_API_KEY": "key-entry",
        "MEMREC_HOST": "127.0.0.1",
        "MEMREC_PORT": str(port),
        "MEMREC_TORCH_THREADS": "1",
    }
    # serve before any training: a clear refusal, not a crash loop on a missing file.
    early = _run(env, "serve")
    assert early.returncode == 2 and "run the 'train' command first" in early.stderr

    first = _run(env, "train")
    assert first.returncode == 0, first.stderr[-3000:]
    model = tmp_path / "models" / "current"
    assert (model / "config.json").is_file() and not (tmp_path / "models" / "current.partial").exists()
    assert not (model / "checkpoints").exists()
    loaded = json.loads(first.stdout)
    assert loaded["written"] == loaded["bank_rows"] == loaded["memories"] > 100
    assert Path(loaded["snapshot"], "position.json").is_file()

    again = _run(env, "train")
    assert again.returncode == 0 and "model found" in again.stderr
    assert (
        json.loads(again.stdout)["written"] == 0
        and json.loads(again.stdout)["memories"] == loaded["memories"]
    )

    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), "serve"], env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        headers = {"X-API-Key": "key-entry"}
        r = httpx.post(f"{base}/recommend", json={"user_id": "u3", "n": 5}, headers=headers, timeout=10)
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        assert httpx.post(f"{base}/recommend", json={"user_id": "u3"}, timeout=10).status_code == 401
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert f"memrec_memory_bank_size {float(loaded['memories'])}" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        code = proc.wait(timeout=60)
    text = log_path.read_text()
    # exec: the server replaced the shell, so the signal reached it and it drained and snapshotted
    # before exiting (uvicorn re-raises the signal after a clean shutdown: -15 is that exit).
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text
    assert "snapshot at" in text
    # The bank was loaded once, by `train`; no secret appears in the log.
    assert "memory bank already loaded" in text and "pw-entry" not in text and "key-entry" not in text


async def log_interactions(env: dict[str, str], events: list[tuple[str, str]]) -> None:
    """(user, external item) interactions into the served model's store, as the API would write them:
    unknown items registered first, every event logged."""
    from memory_store import Interaction, open_store
    from model import artifact
    from service.app import store_config

    settings = Settings(model_dir=env["MEMREC_MODEL_DIR"], redis_url=env["MEMREC_REDIS_URL"])
    art = artifact.load(settings.model_dir)
    config = store_config(settings, art.encoder.cfg.dim, art.model_version, art.vocab.n_items)
    store = await open_store(config)
    try:
        (new,) = await store.register_items(["sku-new"])
        logged = [
            Interaction(user, new if item == "sku-new" else art.vocab.item_id(item), 2e9 + k, f"ev{k}")
            for k, (user, item) in enumerate(events)
        ]
        assert (await store.append_interactions(logged)).accepted == len(events)
    finally:
        await store.close()


@pytest.mark.timeout(600)
async def test_entrypoint_retrain_loop_publishes_versions(
    redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    redis = redis_server()
    data = write_toy_dataset(tmp_path / "toy.txt")
    models = tmp_path / "models"
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "MEMREC_BIN": str(_wrapper(tmp_path)),
        "MEMREC_DATASET": str(data),
        "MEMREC_DATA_DIR": str(tmp_path / "data"),
        "MEMREC_MODEL_DIR": str(models / "current"),
        "MEMREC_TRAIN_ARGS": "--epochs 2 --ft-epochs 1 --k 5 --threads 1 --device cpu --no-vote",
        "MEMREC_RETRAIN_ARGS": "--epochs 1 --ft-epochs 1 --k 5 --threads 1 --device cpu --no-vote",
        "MEMREC_KEEP_VERSIONS": "2",
        "MEMREC_REDIS_URL": redis.url,
        "MEMREC_STORE_DIR": str(tmp_path / "store"),
    }
    assert _run(env, "retrain").returncode == 2  # nothing to retrain from yet
    first = _run(env, "train")
    assert first.returncode == 0, first.stderr[-3000:]
    current = models / "current"
    assert current.is_symlink() and os.readlink(current).startswith("versions/")
    v1 = current.resolve()

    await log_interactions(env, [("u1", "i3"), ("u1", "sku-new"), ("w9", "sku-new"), ("w9", "i4")])
    second = _run(env, "retrain")
    assert second.returncode == 0, second.stderr[-3000:]
    v2 = current.resolve()
    assert v2 != v1 and v1.is_dir() and current.is_symlink()
    (export,) = sorted((models / "exports").glob("*.inter"))
    assert export.stem == v2.name  # a version is named as the export it was trained on
    lines = export.read_text().splitlines()
    assert len(lines) == 1 + data.read_text().count(" ") + 4  # header, every training row, the log
    config = json.loads((v2 / "config.json").read_text())
    assert config["dataset_file"] == str(export)
    assert "sku-new" in json.loads((v2 / "vocab.json").read_text())["items"]
    reindexed = json.loads(second.stdout)  # the new version's bank went into its own namespace
    assert reindexed["model_version"] == config["model_version"] and reindexed["written"] > 0

    # the next retrain starts from v2 and its training data (the first export); two versions are kept
    time.sleep(1.1)  # versions are named by the second
    third = _run(env, "retrain")
    assert third.returncode == 0, third.stderr[-3000:]
    v3 = current.resolve()
    assert sorted(p.name for p in (models / "versions").iterdir()) == [v2.name, v3.name]
    assert len((models / "exports" / f"{v3.name}.inter").read_text().splitlines()) == len(lines)


def test_configuration_reference_documents_every_setting() -> None:
    """docs/configuration.md's table of service settings is `Settings`, name for name and default for
    default; the entrypoint's own variables are documented on the same page."""
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start = reference.index("## Service settings")
    end = reference.find("\n## ", start + 1)
    section = reference[start : end if end >= 0 else None]
    rows = dict(re.findall(r"^\| `(MEMREC_\w+)` \| ([^|]+) \|", section, flags=re.M))
    assert set(rows) == SETTINGS_VARS, set(rows) ^ SETTINGS_VARS
    for name, field in Settings.model_fields.items():
        shown = rows[f"MEMREC_{name.upper()}"].strip().strip("`")
        if field.is_required():
            assert shown == "required"
        elif field.default is None:
            assert shown.startswith("unset") or name == "namespace"
        elif isinstance(field.default, bool):
            assert shown == str(field.default).lower()
        elif isinstance(field.default, int | float):
            assert float(shown) == float(field.default), name
        else:
            assert shown == str(field.default), name
    for name in ENTRYPOINT_VARS - {"MEMREC_BIN"}:
        assert f"`{name}`" in reference, name
