"""The app factory: ``create_app(settings)`` builds the FastAPI app; the lifespan loads the model, opens
the store, bulk-loads the artifact's memory bank (once per namespace) and starts the micro-batcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import faiss
import torch
from fastapi import FastAPI

from memory_store import IndexParams, MemoryStore, StoreConfig, open_store
from model import artifact
from service.bank import load_bank
from service.errors import install_handlers
from service.ingest import Ingestor
from service.metrics import Metrics
from service.middleware import ObserveRequests
from service.pipeline import Pipeline
from service.recommender import Recommender
from service.routes import health, interactions, recommend
from service.settings import Settings
from service.state import Runtime

log = logging.getLogger(__name__)


def store_config(settings: Settings, dim: int, model_version: str) -> StoreConfig:
    return StoreConfig(
        dim=dim,
        namespace=settings.store_namespace(model_version),
        redis_url=settings.redis_url,
        data_dir=settings.store_dir,
        history_len=max(200, settings.history_len),
        index=IndexParams(exact_threshold=settings.exact_threshold, nprobe=settings.nprobe),
    )


async def build_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Load everything a replica serves with (the benchmark builds one without HTTP)."""
    torch.set_num_threads(settings.torch_threads)
    faiss.omp_set_num_threads(settings.torch_threads)
    art = await asyncio.to_thread(artifact.load, settings.model_dir, settings.device)
    store: MemoryStore = await open_store(store_config(settings, art.encoder.cfg.dim, art.model_version))
    try:
        if settings.load_bank and art.bank is not None:
            await load_bank(store, art.bank, art.vocab)
        metrics.observe_store(await store.stats())
    except BaseException:
        await store.close()
        raise
    rec = Recommender(art)
    pipeline = Pipeline(
        rec,
        store,
        metrics,
        history_len=settings.history_len,
        max_batch=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000.0,
    )
    ingestor = Ingestor(rec, store, metrics, settings.history_len, settings.frozen_memory)
    log.info(
        "serving %s (%s, retrieval %s) from namespace %s",
        art.model_version,
        art.dataset,
        "on" if rec.retrieval else "off",
        store_config(settings, art.encoder.cfg.dim, art.model_version).namespace,
    )
    return Runtime(settings, art.model_version, art.vocab, store, pipeline, ingestor)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = await build_runtime(app.state.settings, app.state.metrics)
    runtime.pipeline.start()
    app.state.runtime = runtime
    try:
        yield
    finally:
        app.state.runtime = None
        await runtime.pipeline.stop()
        await runtime.store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; settings default to the environment (``MEMREC_*``)."""
    settings = settings or Settings()  # type: ignore[call-arg]  # model_dir comes from the environment
    metrics = Metrics()
    app = FastAPI(
        title="memrec",
        summary="Online retrieval-augmented sequential recommendation",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    install_handlers(app, metrics)
    app.add_middleware(ObserveRequests, metrics=metrics, max_body_bytes=settings.max_request_bytes)
    for module in (recommend, interactions, health):
        app.include_router(module.router)
    return app
