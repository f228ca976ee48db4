"""Drift replay with new items included: can a live memory recommend items the model never saw?

Train on the ml-100k interactions before a time cut (the product default: fusion, vote and transition
channel chosen on validation), then replay the later ones in time order through the API, asking
/recommend (top 10) before each one and posting it after, in four arms over the very same events:

* ``frozen``: the bank as trained; the events only extend histories, new items are refused;
* ``live, new items refused``: every accepted event adds a memory; an event with an item the model
  does not know is refused (422), as memrec did before it had a catalogue of its own;
* ``live, new items accepted``: unknown items are registered by the store and their events stored like
  any other, so they can come back through the transition channel and the vote (the service's
  defaults: these models have the channel, so new items get no derived embedding,
  ``MEMREC_NEW_ITEM_EMBEDDINGS=auto``);
* ``live, new items accepted, weighted``: the same with new items' transition counts weighted
  ``WEIGHTED`` times (``MEMREC_NEW_ITEM_WEIGHT``: their counts cover only the time since they first
  appeared);
* ``live, new items accepted, derived``: the defaults with derived embeddings for new items
  (``MEMREC_NEW_ITEM_EMBEDDINGS=on``), so that the encoder and the fusion score them too.

Reported: the share of later events whose item is new, HR@10 and NDCG@10 on all later events and on the
new-item events, and paired differences with 95 % intervals (users resampled).

    python -m bench.service new-items --cut 0.5 [--events N] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.common import ROOT
from bench.drift import paired, split_by_time
from bench.serving import flush, model_card
from service.settings import NewItemEmbeddingsMode, Settings

log = logging.getLogger("bench.new_items")

NEW_ITEMS_REDIS_URL = "redis://127.0.0.1:6379/14"
DEFAULT_WEIGHT: float = Settings.model_fields["new_item_weight"].default  # the service's
NewItems = Literal["accept", "reject"]
EMBEDDINGS: NewItemEmbeddingsMode = Settings.model_fields["new_item_embeddings"].default  # the service's


@dataclass(frozen=True)
class Arm:
    frozen: bool  # no memory written
    new_items: NewItems  # what /interactions does with an unknown item
    weight: float | None = None  # MEMREC_NEW_ITEM_WEIGHT; None: the service's default
    embeddings: NewItemEmbeddingsMode | None = None  # MEMREC_NEW_ITEM_EMBEDDINGS; None: the service's default


WEIGHTED = 5.0  # the weighted arm's MEMREC_NEW_ITEM_WEIGHT
# Every search exact (MEMREC_EXACT_THRESHOLD): over a bank past the threshold (the 80 % cut's) the IVF
# search did not repeat. Two runs of one arm answered 79 of the first 4,000 events differently and ended
# 0.0012 HR@10 apart, more than the arms differ; likely because the lists are trained on what the index
# holds when it grows, which the timing of the start-up bulk load decides. Exact search repeats exactly.
EXACT_THRESHOLD = 10**9
ARMS = {
    "frozen": Arm(True, "reject"),
    "live_reject": Arm(False, "reject"),
    "live_accept": Arm(False, "accept"),
    "live_accept_weighted": Arm(False, "accept", WEIGHTED),
    "live_accept_derived": Arm(False, "accept", embeddings="on"),
}
COMPARISONS = (
    ("live_accept", "live_reject"),
    ("live_accept_weighted", "live_reject"),
    ("live_accept_weighted", "live_accept"),
    ("live_accept_weighted", "frozen"),
    ("live_accept_derived", "live_reject"),
    ("live_accept_derived", "live_accept"),
    ("live_reject", "frozen"),
)


TRAIN = [sys.executable, "-m", "service.cli", "train"]


def train_flags(epochs: int, ft_epochs: int) -> list[str]:
    """How the drift replays' models are trained (the product default, short): data and output apart."""
    return ["--objective", "sasrec", "--scheme", "allpos", "--epochs", str(epochs), "--ft-epochs",
            str(ft_epochs), "--device", "cpu", "--threads", "1", "--vote", "--transitions"]  # fmt: skip


async def replay(
    model: Path, later: list[tuple[str, str, float]], arm: str, redis_url: str = NEW_ITEMS_REDIS_URL
) -> dict[str, Any]:
    """Per event: ``hit`` (its item in the top 10 asked just before it) and ``gain`` (its NDCG@10);
    ``derived``: whether new items got derived embeddings."""
    import httpx

    from service.app import create_app

    logging.getLogger("httpx").setLevel(logging.WARNING)
    spec = ARMS[arm]
    settings = Settings(
        model_dir=model,
        redis_url=redis_url,
        namespace=f"new-items-{arm}",
        frozen_memory=spec.frozen,
        new_items=spec.new_items,
        new_item_weight=DEFAULT_WEIGHT if spec.weight is None else spec.weight,
        new_item_embeddings=spec.embeddings or EMBEDDINGS,
        exact_threshold=EXACT_THRESHOLD,
    )
    app = create_app(settings)
    hit, gain = np.zeros(len(later)), np.zeros(len(later))
    refused = 0
    async with app.router.lifespan_context(app):
        derived = app.state.runtime.pipeline.new_items.derive
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for e, (u, i, t) in enumerate(later):
                body = (await client.post("/recommend", json={"user_id": u, "n": 10})).json()
                ranked = [it["item_id"] for it in body["items"]]
                if i in ranked:
                    hit[e], gain[e] = 1.0, 1.0 / math.log2(ranked.index(i) + 2)
                r = await client.post(
                    "/interactions", json={"events": [{"user_id": u, "item_id": i, "timestamp": t}]}
                )
                if r.status_code == 422 and spec.new_items == "reject":
                    refused += 1  # an unknown item, refused as asked
                else:
                    r.raise_for_status()
    return {"hit": hit, "gain": gain, "refused": refused, "derived": derived}


@dataclass(frozen=True)
class DriftSetup:
    """A time-cut replay's inputs: the later events and the model trained on the earlier part."""

    work: Path  # artifacts/drift/cut<percent>
    later: list[tuple[str, str, float]]  # (user, item, timestamp) in time order
    known: set[str]  # the items the earlier part holds (the model's vocabulary)
    model: Path
    train: list[str]  # the command that trained it
    flags: list[str]  # its training flags (data and output apart)


def drift_setup(args: argparse.Namespace, seed: int = 0) -> DriftSetup:
    """Split ml-100k at ``args.cut`` and train the model with training seed ``seed`` (once per cut and
    seed: the replays share it)."""
    data_dir = Path(args.data_dir or os.environ.get("MEMREC_DATA_DIR") or "../shared/data")
    work = ROOT / "artifacts" / "drift" / f"cut{round(args.cut * 100)}"
    work.mkdir(parents=True, exist_ok=True)
    early, later, known = split_by_time(data_dir / "ml-100k" / "ml-100k.inter", args.cut, work)
    later = later[: args.events] if args.events else later
    model = work / ("model-vote-transitions" + (f"-seed{seed}" if seed else ""))
    flags = train_flags(args.epochs, args.ft_epochs) + (["--seed", str(seed)] if seed else [])
    train = [*TRAIN, "--dataset", str(early), "--out", str(model), *flags]
    if not (model / "config.json").is_file():
        subprocess.run(train, check=True, capture_output=True)
    return DriftSetup(work, later, known, model, train, flags)


def run_new_items(args: argparse.Namespace) -> dict[str, Any]:
    """Every arm of ``args.arms`` (default all) replayed with the model of each training seed of
    ``args.seeds`` (default 0). An arm's figures are means over its seeds; a comparison's interval
    resamples users over each event's difference averaged over the seeds: seeds differ in
    the model (encoder, fusion and the choice of vote and channel), so they are independent draws of
    the known items' noise while the new items' signal repeats."""
    seeds, names = list(args.seeds), list(args.arms or ARMS)
    setups = {seed: drift_setup(args, seed) for seed in seeds}
    first = setups[seeds[0]]
    later, known, model, train = first.later, first.known, first.model, first.train
    is_new = np.array([i not in known for _, i, _ in later])
    users = [u for u, _, _ in later]
    redis_url = args.redis_url or NEW_ITEMS_REDIS_URL
    runs: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in names}
    for seed, setup in setups.items():
        for arm in names:
            flush(redis_url)
            log.info("new-items replay, seed %d, arm %s: %d events", seed, arm, len(later))
            runs[arm][seed] = asyncio.run(replay(setup.model, later, arm, redis_url))
    flush(redis_url)
    arms = {arm: pool_seeds(per_seed) for arm, per_seed in runs.items()}
    result: dict[str, Any] = {
        "dataset": "ml-100k",
        "cut_quantile": args.cut,
        "events": len(later),
        "new_item_events": int(is_new.sum()),
        "new_item_share": float(is_new.mean()),
        "new_items": len({i for (_, i, _), n in zip(later, is_new, strict=True) if n}),
        "model": model_card(model),
        "seeds": seeds,
        "models": {str(seed): model_card(setup.model) for seed, setup in setups.items()},
        "new_item_weight": DEFAULT_WEIGHT,
        "weighted_new_item_weight": WEIGHTED,
        "new_item_embeddings": EMBEDDINGS,
        "exact_search": True,
        "train_command": shlex.join(["memrec", *train[3:]]).replace(str(ROOT) + "/", ""),
        "arms": {arm: _metrics(r, is_new) for arm, r in arms.items()},
        "arms_by_seed": {a: {str(s): _metrics(r, is_new) for s, r in rs.items()} for a, rs in runs.items()},
        "paired": {},
    }
    if "live_accept" in runs:  # what the default setting made of each seed's model
        derived = {str(seed): r["derived"] for seed, r in runs["live_accept"].items()}
        result["derived_embeddings"] = derived[str(seeds[0])]
        result["derived_embeddings_by_seed"] = derived
    for a, b in COMPARISONS:
        if a not in arms or b not in arms:
            continue
        result["paired"][f"{a} - {b}"] = {
            f"{metric}@10 {scope}": paired(
                arms[a][key][m], arms[b][key][m], [u for u, k in zip(users, m, strict=True) if k]
            )
            for metric, key in (("hr", "hit"), ("ndcg", "gain"))
            for scope, m in (("all", np.ones_like(is_new)), ("new items", is_new))
            if m.any()
        }
    return result


def pool_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Each event's hit and gain averaged over the seeds' replays; the refusals of the first seed (the
    same events are refused with any model)."""
    first = next(iter(per_seed.values()))
    return {
        "hit": np.mean([r["hit"] for r in per_seed.values()], axis=0),
        "gain": np.mean([r["gain"] for r in per_seed.values()], axis=0),
        "refused": first["refused"],
        "derived": first["derived"],
    }


def _metrics(r: dict[str, Any], is_new: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"refused": r["refused"]}
    for scope, m in (("all", np.ones_like(is_new)), ("new items", is_new)):
        if m.any():
            out[scope] = {"hr@10": float(r["hit"][m].mean()), "ndcg@10": float(r["gain"][m].mean())}
    return out


def new_items_md(key: str, r: dict[str, Any]) -> list[str]:
    """The report section of one cut."""
    seeds = r.get("seeds", [0])
    pooled = ""
    if len(seeds) > 1:
        derived = r.get("derived_embeddings_by_seed", {})
        chosen = "; ".join(
            f"seed {seed}: vote weight {m['vote']['weight']:g}, λ {m['transition_weight']:g}"
            + (", learned hybrid" if m.get("hybrid") else "")
            + (", new items with derived embeddings" if derived.get(seed) else "")
            for seed, m in r["models"].items()
        )
        pooled = (
            f" Each arm replayed with the models of {len(seeds)} training seeds (`--seed`; {chosen}); its "
            "figures are their means, and a comparison's interval resamples users over each event's "
            "difference averaged over the seeds."
        )
    lines = [
        f"## Drift replay with new items, {r['cut_quantile']:.0%} cut"
        + (f", {len(seeds)} seeds" if len(seeds) > 1 else "")
        + f" (`{r['command']}`, {r['date']}, {r.get('machine', 'machine not recorded')})",
        "",
        f"ml-100k split by time; the model trained on the earlier part (`{r['train_command']}`; vote "
        f"weight {r['model']['vote']['weight']:g}, transition λ {r['model']['transition_weight']:g}"
        + (", learned hybrid" if r["model"].get("hybrid") else "")
        + "). The "
        f"first {r['events']} later interactions replayed in time order, /recommend (top 10) asked before "
        f"each: {r['new_item_events']} of them ({r['new_item_share']:.1%}) are with one of "
        f"{r['new_items']} items the model never saw.{_weights(r)}"
        + (" Every memory search exact, so that a rerun repeats each arm." if r.get("exact_search") else "")
        + pooled,
        "",
        "| arm | HR@10 all | NDCG@10 all | HR@10 new items | NDCG@10 new items | events refused |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm, m in r["arms"].items():
        new = m.get("new items", {"hr@10": math.nan, "ndcg@10": math.nan})
        lines.append(
            f"| {arm.replace('_', ', ')} | {m['all']['hr@10']:.4f} | {m['all']['ndcg@10']:.4f} | "
            f"{new['hr@10']:.4f} | {new['ndcg@10']:.4f} | {m['refused']} |"
        )
    lines += ["", "Paired differences over the same events (95 % intervals, users resampled):", ""]
    lines += ["| comparison | metric | mean | 95 % interval |", "|---|---|---:|---|"]
    for name, per in r["paired"].items():
        for metric, p in per.items():
            lines.append(
                f"| {name} | {metric} | {p['mean']:+.4f} | [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] |"
            )
    return [*lines, ""]


def _weights(r: dict[str, Any]) -> str:
    """How the accepted arms weighed new items' counts (records from before the weight: nothing)."""
    if "weighted_new_item_weight" not in r:
        return ""
    derived = ""
    if len(r.get("derived_embeddings_by_seed", {})) > 1:
        derived = (
            f" `MEMREC_NEW_ITEM_EMBEDDINGS={r['new_item_embeddings']}`: whether a seed's model gave new "
            "items derived embeddings is said with its seed."
        )
    elif "derived_embeddings" in r:
        derived = f" `MEMREC_NEW_ITEM_EMBEDDINGS={r['new_item_embeddings']}`: " + (
            "new items get derived embeddings."
            if r["derived_embeddings"]
            else "new items get no derived embedding (the model has the vote or the channel to rank them)."
        )
        if "live_accept_derived" in r["arms"]:
            derived += " The *derived* arm sets it to `on`."
    weighted = ""
    if "live_accept_weighted" in r["arms"]:
        weighted = f" or, *weighted*, {r['weighted_new_item_weight']:g}"
    return (
        f" Accepted new items' transition counts weigh {r['new_item_weight']:g} (the default of "
        f"`MEMREC_NEW_ITEM_WEIGHT`){weighted}.{derived}"
    )
