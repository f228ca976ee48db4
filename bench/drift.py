"""The drift benchmark: does a live memory bank keep up with a changing catalogue?

Train on the ml-100k interactions before a time cut, then replay the later ones in time order through
the API, asking /recommend before each one, twice: with live memory updates and with a frozen bank.
The two arms are compared per event (paired, users resampled), by user and item group, and beside a
model-free item-transition reference over the same events, live and frozen, alone and mixed into the
model's ranking.

    python -m bench.service drift --cut 0.9 [--vote] [--transitions] [--events N]
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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT
from bench.serving import flush, model_card

DRIFT_REDIS_URL = "redis://127.0.0.1:6379/13"
Candidates = list[tuple[list[str], np.ndarray]]  # per event: the model's top items (m,), scores (m,)
MIX_DEPTH = 200  # model candidates the transition mix re-ranks
MIX_WEIGHTS = (0.1, 0.2, 0.3, 0.5)
REFERENCE_ORDER = 5  # the model-free reference reads the user's last 5 items


Event = tuple[str, str, float]  # user, item, timestamp


def time_split(inter: Path, quantile: float, out_dir: Path) -> tuple[Path, list[Event]]:
    """Sequences of the interactions before the cut (a training file), and the later events in order
    whose items the earlier part holds (:func:`split_by_time` keeps the others too)."""
    early, later, known = split_by_time(inter, quantile, out_dir)
    return early, [r for r in later if r[1] in known]


def split_by_time(inter: Path, quantile: float, out_dir: Path) -> tuple[Path, list[Event], set[str]]:
    """The training file of the interactions before the cut, every later event in order, and the items
    the earlier part holds (the model's vocabulary)."""
    rows: list[tuple[str, str, float]] = []
    with inter.open(encoding="utf-8") as f:
        next(f)
        for line in f:
            u, i, _, ts = line.rstrip("\n").split("\t")
            rows.append((u, i, float(ts)))
    rows.sort(key=lambda r: r[2])
    cut = rows[int(len(rows) * quantile)][2]
    seqs: dict[str, list[str]] = {}
    for u, i, t in rows:
        if t < cut:
            seqs.setdefault(u, []).append(i)
    kept = {u: s for u, s in seqs.items() if len(s) >= 3}  # leave-one-out needs three
    later = [r for r in rows if r[2] >= cut]
    path = out_dir / "early.txt"
    path.write_text("".join(f"{u} {' '.join(s)}\n" for u, s in kept.items()), encoding="utf-8")
    return path, later, {i for s in kept.values() for i in s}


async def replay(model: Path, later: list[tuple[str, str, float]], frozen: bool, ns: str) -> dict[str, Any]:
    """Ask /recommend before each later event, then post it. Per event: ``hit`` (the target in the top
    10) and ``gain`` (its NDCG@10), kept for the paired comparison and left out of the report."""
    import httpx

    from service.app import create_app
    from service.settings import Settings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    settings = Settings(model_dir=model, redis_url=DRIFT_REDIS_URL, namespace=ns, frozen_memory=frozen)
    app = create_app(settings)
    hit, gain = np.zeros(len(later)), np.zeros(len(later))
    candidates: Candidates = []
    used = fresh = 0
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for e, (u, i, t) in enumerate(later):
                req = {"user_id": u, "n": MIX_DEPTH, "explain": True}
                body = (await client.post("/recommend", json=req)).json()
                top = body["items"]  # the top 10 score the model; all of them feed the transition mix
                candidates.append(([it["item_id"] for it in top], np.array([it["score"] for it in top])))
                ranked = candidates[-1][0][:10]
                used += len(body.get("memories", []))
                fresh += sum(m["timestamp"] > 0 for m in body.get("memories", []))  # bank memories: ts 0
                if i in ranked:
                    hit[e], gain[e] = 1.0, 1.0 / math.log2(ranked.index(i) + 2)
                ev = {"user_id": u, "item_id": i, "timestamp": t}
                r = await client.post("/interactions", json={"events": [ev]})
                r.raise_for_status()
            stats = await app.state.runtime.store.stats()
    return {
        "events": len(later),
        "hr@10": float(hit.mean()),
        "ndcg@10": float(gain.mean()),
        "memories_after": stats.memories,
        "memories_used": used,
        "replayed_memories_used": fresh,
        "hit": hit,
        "gain": gain,
        "candidates": candidates,
    }


def paired(
    live: np.ndarray, frozen: np.ndarray, users: list[str], rounds: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Live minus frozen over the same events (n,) of ``users`` (n,): the mean, a 95 % bootstrap interval
    that resamples users with replacement (a user's events move together: they share a history and are
    not independent), the mean over each quarter of the replay in time order (live memories
    accumulate), and how many events score differently at all."""
    d = live - frozen
    ids = np.unique(np.asarray(users, dtype=object), return_inverse=True)[1]  # (n,) user index
    per_user, count = np.bincount(ids, weights=d), np.bincount(ids).astype(float)  # (U,), (U,)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(count), (rounds, len(count)))  # (rounds, U) resampled users
    means = per_user[draws].sum(1) / count[draws].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "mean": float(d.mean()),
        "ci95": [float(lo), float(hi)],
        "by_quarter": [float(q.mean()) for q in np.array_split(d, 4)],
        "events_changed": int((d != 0).sum()),
    }


def groups(early: Path, later: list[tuple[str, str, float]], rising: float = 1.5) -> dict[str, np.ndarray]:
    """Boolean event masks (n,): returning users (with a history before the cut) and new ones; targets
    whose share of the later events is at least ``rising`` times their share before the cut (the
    trend that only live memories can see) and the rest."""
    rows = [line.split() for line in early.read_text(encoding="utf-8").splitlines()]  # user, items…
    before = Counter(i for row in rows for i in row[1:])
    after = Counter(i for _, i, _ in later)
    n_before, n_after = sum(before.values()), len(later)
    returning = {row[0] for row in rows}
    ret = np.array([u in returning for u, _, _ in later])
    up = np.array([after[i] / n_after >= rising * before[i] / n_before for _, i, _ in later])
    return {"returning users": ret, "new users": ~ret, "rising items": up, "other items": ~up}


def _next_scores(follow: dict[str, dict[str, float]], recent: list[str]) -> dict[str, float]:
    """Items that followed the recent ones (oldest first), the k-th most recent counting 1/k."""
    scores: dict[str, float] = {}
    for k, prev in enumerate(reversed(recent), start=1):
        for j, c in follow.get(prev, {}).items():
            scores[j] = scores.get(j, 0.0) + c / k
    return scores


def _mix(
    candidate: tuple[list[str], np.ndarray],
    scores: dict[str, float],
    seen: set[str],
    weights: Sequence[float],
) -> dict[float, list[str]]:
    """The top 10 of the model's candidates under (1 − λ) · softmax + λ · transition share, per λ."""
    items, logits = candidate  # the model's ranking, seen items already masked: (m,), (m,)
    p_model = np.exp(logits - logits.max())
    p_model /= p_model.sum()  # (m,) renormalised over the candidates
    total = sum(c for j, c in scores.items() if j not in seen)
    p_next = np.array([0.0 if j in seen else scores.get(j, 0.0) for j in items]) / (total or 1.0)  # (m,)
    mixed = {w: (1.0 - w) * p_model + w * p_next for w in weights}
    return {w: [items[x] for x in np.argsort(-m, kind="stable")[:10]] for w, m in mixed.items()}


def transition_replay(
    early: Path,
    later: list[tuple[str, str, float]],
    live: bool,
    order: int = REFERENCE_ORDER,
    candidates: Candidates | None = None,
    weights: Sequence[float] = (),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A model-free reference beside the model: rank items by how often they followed the user's last
    ``order`` items in the stored sequences (the k-th most recent item counts 1/k, and so does each
    transition it made), seen items masked. ``live`` adds each replayed event's transitions after its
    recommendation; frozen keeps the sequences before the cut. With the model's ``candidates``, also
    re-rank them by (1 − λ) · softmax(model scores) + λ · transition share, for each λ in ``weights``.
    Per entry (``reference``, ``mix λ``) and event (n,): hit and NDCG@10. It measures how much the later
    events tell a recommender that reads them, against what the model takes from its memory bank."""
    hist: dict[str, list[str]] = {}
    follow: dict[str, dict[str, float]] = {}  # item -> {next item: weight}

    def add(u: str, i: str) -> None:
        h = hist.setdefault(u, [])
        for k, prev in enumerate(reversed(h[-order:]), start=1):
            nxt = follow.setdefault(prev, {})
            nxt[i] = nxt.get(i, 0.0) + 1.0 / k
        h.append(i)

    for row in (line.split() for line in early.read_text(encoding="utf-8").splitlines()):
        for i in row[1:]:
            add(row[0], i)
    names = ["reference", *(f"mix {w:g}" for w in weights)] if candidates else ["reference"]
    out = {name: (np.zeros(len(later)), np.zeros(len(later))) for name in names}
    for e, (u, i, _) in enumerate(later):
        h = hist.setdefault(u, [])
        seen, scores = set(h), _next_scores(follow, h[-order:])
        best = sorted(scores, key=lambda j: -scores[j])  # stable: ties keep the order first scored
        rankings = {"reference": [j for j in best if j not in seen][:10]}
        if candidates and candidates[e][0]:
            rankings |= {f"mix {w:g}": r for w, r in _mix(candidates[e], scores, seen, weights).items()}
        for name, ranked in rankings.items():
            if i in ranked:
                out[name][0][e], out[name][1][e] = 1.0, 1.0 / math.log2(ranked.index(i) + 2)
        if live:
            add(u, i)
        else:
            h.append(i)  # histories move on in both; only live transitions enter the counts
    return out


def drift_section(vote: bool, cut: float, transitions: bool = False) -> str:
    """The report key of a drift run: ``drift``, ``drift_vote``, ``drift_vote_transitions``, and
    ``_cut80`` &c. away from the 90 % cut (the first runs', whose keys stay as they were)."""
    head = "drift" + ("_vote" if vote else "") + ("_transitions" if transitions else "")
    return head + ("" if cut == 0.9 else f"_cut{round(cut * 100)}")


def run_drift(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir or os.environ.get("MEMREC_DATA_DIR") or "../shared/data")
    work = ROOT / "artifacts" / "drift" / f"cut{round(args.cut * 100)}"
    work.mkdir(parents=True, exist_ok=True)
    early, later = time_split(data_dir / "ml-100k" / "ml-100k.inter", args.cut, work)
    model = work / ("model" + ("-vote" if args.vote else "") + ("-transitions" if args.transitions else ""))
    train = [sys.executable, "-m", "service.cli", "train", "--dataset", str(early), "--out", str(model),
             "--objective", "sasrec", "--scheme", "allpos", "--epochs", str(args.epochs), "--ft-epochs",
             str(args.ft_epochs), "--device", "cpu", "--threads", "1"]  # fmt: skip
    train.append("--vote" if args.vote else "--no-vote")
    train.append("--transitions" if args.transitions else "--no-transitions")
    if not (model / "config.json").is_file():
        subprocess.run(train, check=True, capture_output=True)
    later = later[: args.events] if args.events else later
    flush(DRIFT_REDIS_URL)
    live = asyncio.run(replay(model, later, frozen=False, ns="drift-live"))
    frozen = asyncio.run(replay(model, later, frozen=True, ns="drift-frozen"))
    flush(DRIFT_REDIS_URL)
    by_group = {
        name: {
            "events": int(m.sum()),
            "live": {"hr@10": float(live["hit"][m].mean()), "ndcg@10": float(live["gain"][m].mean())},
            "frozen": {"hr@10": float(frozen["hit"][m].mean()), "ndcg@10": float(frozen["gain"][m].mean())},
        }
        for name, m in groups(early, later).items()
        if m.any()
    }
    event_users = [u for u, _, _ in later]
    gains = {
        "hr@10": paired(live.pop("hit"), frozen.pop("hit"), event_users),
        "ndcg@10": paired(live.pop("gain"), frozen.pop("gain"), event_users),
    }
    arms = {
        name: transition_replay(
            early, later, name == "live", REFERENCE_ORDER, arm.pop("candidates"), MIX_WEIGHTS
        )
        for name, arm in (("live", live), ("frozen", frozen))
    }
    transitions: dict[str, Any] = {"order": REFERENCE_ORDER, "depth": MIX_DEPTH}
    for entry in arms["live"]:  # reference, mix 0.1, …
        (t_hit, t_gain), (f_hit, f_gain) = arms["live"][entry], arms["frozen"][entry]
        transitions[entry] = {
            "live": {"hr@10": float(t_hit.mean()), "ndcg@10": float(t_gain.mean())},
            "frozen": {"hr@10": float(f_hit.mean()), "ndcg@10": float(f_gain.mean())},
            "paired": {
                "hr@10": paired(t_hit, f_hit, event_users),
                "ndcg@10": paired(t_gain, f_gain, event_users),
            },
        }
    return {
        "dataset": "ml-100k",
        "cut_quantile": args.cut,
        "vote": model_card(model)["vote"],
        "transition_weight": model_card(model)["transition_weight"],
        "train_command": shlex.join(["memrec", *train[3:]]).replace(str(ROOT) + "/", ""),
        "live": live,
        "frozen": frozen,
        "hr@10_gain": live["hr@10"] - frozen["hr@10"],
        "ndcg@10_gain": live["ndcg@10"] - frozen["ndcg@10"],
        "paired": gains,
        "groups": by_group,
        "transitions": transitions,
    }
