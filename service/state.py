"""The objects the lifespan builds once and the routes receive through ``Depends``.

The providers are coroutines on purpose: FastAPI runs a plain-function dependency in its thread pool,
one thread hop (and, under load, a GIL hand-off) per dependency per request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from memory_store import MemoryStore
from model.data import Vocab
from service.ingest import Ingestor
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.routes.items import ItemIds
from service.settings import Settings
from service.versions import Outcomes, Versions


@dataclass
class Runtime:
    settings: Settings
    model_version: str
    model_dir: Path  # resolved: the directory itself, never a link to it
    vocab: Vocab
    store: MemoryStore
    pipeline: Pipeline
    ingestor: Ingestor
    items: ItemIds  # external ↔ internal item ids, the store's new items included


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_runtime(request: Request) -> Runtime:
    """The primary version's runtime: what the routes that serve no particular user read."""
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_versions(request: Request) -> Versions:
    versions: Versions = request.app.state.versions
    return versions


async def get_outcomes(request: Request) -> Outcomes:
    outcomes: Outcomes = request.app.state.outcomes
    return outcomes


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
VersionsDep = Annotated[Versions, Depends(get_versions)]
OutcomesDep = Annotated[Outcomes, Depends(get_outcomes)]
