"""Drift replay with a retrain at the midpoint: does the retrain loop (export → warm retrain → hot swap)
pay for itself over a live memory that never retrains?

Train on the ml-100k interactions before a time cut (the same model as the new-items replay), then
replay the later ones in time order through the API, asking /recommend (top 10) before each one and
posting it after, in two arms over the very same events, new items accepted in both:

* ``live``: the model as trained, its memory live throughout;
* ``retrained``: the same until the middle of the replay; there the service's interaction log is
  exported with the training data (``memrec export --with-training-data``), a model is trained warm on
  it (``memrec train --init-from``, the first model's flags), and the server moves to it through its
  model link (``POST /admin/reload``: load, catch up on the log, switch) before the replay goes on.

Reported on the second half of the replay: HR@10 and NDCG@10 of both arms and their paired
differences with 95 % intervals (users resampled), with the move's own figures.

    python -m bench.service retrain --cut 0.5 --events 20000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT
from bench.drift import paired
from bench.new_items import TRAIN, drift_setup
from bench.serving import flush, model_card
from bench.swap import point

RETRAIN_REDIS_URL = "redis://127.0.0.1:6379/15"
Event = tuple[str, str, float]


async def replay(
    link: Path, later: list[Event], retrain_at: int | None, work: Path, flags: list[str]
) -> dict[str, Any]:
    """Per event: ``hit`` and ``gain`` (NDCG@10) of the top 10 asked just before it; with
    ``retrain_at``, the retrain and move before event ``retrain_at``."""
    import httpx

    from service.app import create_app
    from service.export import export
    from service.settings import Settings

    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings(model_dir=link, redis_url=RETRAIN_REDIS_URL, model_watch_s=0, swap_grace_s=0)
    app = create_app(settings)
    hit, gain = np.zeros(len(later)), np.zeros(len(later))
    move: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            for e, (u, i, t) in enumerate(later):
                if e == retrain_at:
                    move = await retrain(settings, client, work, flags, export)
                body = (await client.post("/recommend", json={"user_id": u, "n": 10})).json()
                ranked = [it["item_id"] for it in body["items"]]
                if i in ranked:
                    hit[e], gain[e] = 1.0, 1.0 / math.log2(ranked.index(i) + 2)
                ev = {"user_id": u, "item_id": i, "timestamp": t, "event_id": f"replay-{e}"}
                (await client.post("/interactions", json={"events": [ev]})).raise_for_status()
    return {"hit": hit, "gain": gain, "move": move}


async def retrain(settings: Any, client: Any, work: Path, flags: list[str], export: Any) -> dict[str, Any]:
    """Export, train warm on it (``flags``: the first model's), move the server to the new model: what
    each step took."""
    t0 = time.perf_counter()
    data = work / "retrain-export.inter"
    summary = await export(settings, data, with_training_data=True)
    t1 = time.perf_counter()
    out = work / "model-retrained"
    base = settings.model_dir.resolve()
    cmd = [*TRAIN, "--dataset", str(data), "--out", str(out), "--init-from", str(base), *flags]
    await asyncio.to_thread(subprocess.run, cmd, check=True, capture_output=True)
    t2 = time.perf_counter()
    point(settings.model_dir, out)
    answer = (await client.post("/admin/reload")).json()
    if answer["outcome"] != "switched":
        raise RuntimeError(f"the move failed: {answer}")
    return {
        "export_s": t1 - t0,
        "train_s": t2 - t1,
        "exported_rows": summary["logged_rows"] + summary["training_rows"],
        "logged_rows": summary["logged_rows"],
        "model": model_card(out),
        "train_command": shlex.join(["memrec", *cmd[3:]]).replace(str(ROOT) + "/", ""),
        **{k: answer[k] for k in ("seconds", "replayed", "from_version", "to_version")},
    }


def run_retrain(args: argparse.Namespace) -> dict[str, Any]:
    setup = drift_setup(args)  # the new-items replay's model: trained once for both
    work, later, model, train, flags = setup.work, setup.later, setup.model, setup.train, setup.flags
    half = len(later) // 2
    arms: dict[str, dict[str, Any]] = {}
    for arm, at in (("live", None), ("retrained", half)):
        flush(RETRAIN_REDIS_URL)
        link = work / f"current-{arm}"
        point(link, model)
        arms[arm] = asyncio.run(replay(link, later, at, work, flags))
    flush(RETRAIN_REDIS_URL)
    second = np.arange(len(later)) >= half
    users = [u for (u, _, _), s in zip(later, second, strict=True) if s]
    result: dict[str, Any] = {
        "dataset": "ml-100k",
        "cut_quantile": args.cut,
        "events": len(later),
        "second_half_events": int(second.sum()),
        "model": model_card(model),
        "train_command": shlex.join(["memrec", *train[3:]]).replace(str(ROOT) + "/", ""),
        "move": arms["retrained"]["move"],
        "arms": {
            arm: {"hr@10": float(r["hit"][second].mean()), "ndcg@10": float(r["gain"][second].mean())}
            for arm, r in arms.items()
        },
        "paired": {
            f"{metric}@10": paired(arms["retrained"][key][second], arms["live"][key][second], users)
            for metric, key in (("hr", "hit"), ("ndcg", "gain"))
        },
    }
    return result


def retrain_md(key: str, r: dict[str, Any]) -> list[str]:
    """The report section of one cut."""
    move = r["move"]
    lines = [
        f"## Drift replay with a retrain at the midpoint, {r['cut_quantile']:.0%} cut (`{r['command']}`, "
        f"{r['date']}, {r.get('machine', 'machine not recorded')})",
        "",
        f"ml-100k split by time; the first model trained on the earlier part (`{r['train_command']}`). The "
        f"first {r['events']} later interactions replayed in time order through the API, new items "
        f"accepted; in the `retrained` arm, after {r['events'] - r['second_half_events']} of them, the "
        f"interaction log was exported with the training data ({move['exported_rows']} rows, "
        f"{move['logged_rows']} from the log, {move['export_s']:.1f} s), a model trained warm on it "
        f"(`{move['train_command']}`, {move['train_s']:.0f} s; its validation chose vote weight "
        f"{move['model']['vote']['weight']:g} and transition λ {move['model']['transition_weight']:g}, "
        f"the first model's {r['model']['vote']['weight']:g} and {r['model']['transition_weight']:g}) "
        "and the server moved to it with "
        f"`POST /admin/reload` ({move['seconds']:.1f} s, {move['replayed']} logged interactions replayed). "
        f"Metrics over the {r['second_half_events']} events after the midpoint:",
        "",
        "| arm | HR@10 | NDCG@10 |",
        "|---|---:|---:|",
        *(f"| {arm} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} |" for arm, m in r["arms"].items()),
        "",
        "Paired differences, retrained − live (95 % intervals, users resampled):",
        "",
        "| metric | mean | 95 % interval |",
        "|---|---:|---|",
    ]
    for metric, p in r["paired"].items():
        lines.append(f"| {metric} | {p['mean']:+.4f} | [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] |")
    return [*lines, ""]
