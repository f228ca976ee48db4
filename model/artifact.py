"""The model directory: one self-contained, versioned artifact that evaluation and the service load.

Layout::

    DIR/config.json         format version, model version, encoder and training configs, dataset (and
                            the file it was read from when not a known data set), metrics
    DIR/inference.json      how the model scores (model.predictor.InferenceConfig), frozen at training
    DIR/vocab.json          external user and item ids (item i is items[i-1]; 0 is padding)
    DIR/model.safetensors   encoder weights (tensors only: loading never executes code)
    DIR/fusion.safetensors  retrieval fusion weights (retrieval-augmented models only)
    DIR/memory.safetensors  the memory bank: keys, items, users, prefix lengths, each prefix's last
                            items (model.transitions), and each user's first item, the one history
                            item no memory holds (same)

A missing or damaged file fails the load with an :class:`ArtifactError` that names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from model.data import Vocab
from model.fusion import FusionConfig, RetrievalFusion
from model.memory import MemoryBank
from model.sasrec import EncoderConfig, SASRec

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
INFERENCE_FILE = "inference.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "model.safetensors"
FUSION_FILE = "fusion.safetensors"
MEMORY_FILE = "memory.safetensors"

M = TypeVar("M", bound=torch.nn.Module)


class ArtifactError(RuntimeError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


@dataclass
class Artifact:
    encoder: SASRec
    vocab: Vocab
    dataset: str
    model_version: str = ""
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    fusion: RetrievalFusion | None = None
    bank: MemoryBank | None = None  # training + validation memories, as at test time
    # (n_users,) each user's first item (0: none), the one history item no memory holds; with the bank
    # it rebuilds every known user's history (model.data.first_items). None in older model directories.
    first_items: np.ndarray | None = None
    finetune_config: dict[str, Any] = field(default_factory=dict)  # how the fusion was trained
    # how the model scores: model.predictor.InferenceConfig's JSON, which alone reads it; {} in model
    # directories written before it had its own file (their finetune config holds it)
    inference: dict[str, Any] = field(default_factory=dict)
    # the file the training data was read from when it is no known data set (model.data.KNOWN_DATASETS
    # names resolve under the data directory): what `memrec export --with-training-data` merges
    dataset_file: str = ""
    # the latest timestamp of the training data (None: data without timestamps): the interactions after
    # it are the ones a service moving to this model replays into it (service.swap)
    data_until: float | None = None

    @property
    def retrieval(self) -> bool:
        return self.fusion is not None and self.bank is not None


def _weights_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def save(artifact: Artifact, out_dir: str | os.PathLike[str]) -> Path:
    """Write the artifact; the model version is derived from the weights, so it changes with them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in artifact.encoder.state_dict().items()}
    save_file(state, out / WEIGHTS_FILE)
    digest = _weights_digest(out / WEIGHTS_FILE)
    for stale in (FUSION_FILE, MEMORY_FILE, INFERENCE_FILE):
        (out / stale).unlink(missing_ok=True)
    if artifact.fusion is not None and artifact.bank is not None:
        fusion_state = {k: v.detach().cpu().contiguous() for k, v in artifact.fusion.state_dict().items()}
        save_file(fusion_state, out / FUSION_FILE)
        bank = artifact.bank
        arrays: dict[str, np.ndarray] = {
            "keys": bank.keys,
            "items": bank.items,
            "users": bank.users,
            "prefix_lens": bank.prefix_lens,
        }
        if bank.recent is not None:
            arrays["recent"] = bank.recent
        if artifact.first_items is not None:
            arrays["first_items"] = artifact.first_items.astype(np.int64)
        save_numpy(arrays, out / MEMORY_FILE)
        digest = f"{digest}-{_weights_digest(out / FUSION_FILE)[:6]}"
    if artifact.inference:
        (out / INFERENCE_FILE).write_text(json.dumps(artifact.inference, indent=2), encoding="utf-8")
    artifact.model_version = f"{artifact.dataset}-{digest}"
    (out / VOCAB_FILE).write_text(json.dumps(artifact.vocab.to_json()), encoding="utf-8")
    config = {
        "format_version": FORMAT_VERSION,
        "model_version": artifact.model_version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": artifact.dataset,
        **({"dataset_file": artifact.dataset_file} if artifact.dataset_file else {}),
        **({"data_until": artifact.data_until} if artifact.data_until is not None else {}),
        "encoder": artifact.encoder.cfg.to_json(),
        "train": artifact.train_config,
        "metrics": artifact.metrics,
    }
    if artifact.fusion is not None:
        config["fusion"] = artifact.fusion.cfg.to_json()
        config["finetune"] = artifact.finetune_config
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


def _load_weights(path: Path, module: M, what: str) -> M:
    """Load a safetensors state dict into ``module``; any failure names the file."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: unreadable weights ({e})") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not match the {what} config ({e})") from None
    return module.eval()


def _load_bank(path: Path, dim: int) -> tuple[MemoryBank, np.ndarray | None]:
    """The bank and the users' first items (absent from model directories written before them)."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        arrays = load_numpy(path)
        keys = arrays["keys"]
        if keys.ndim != 2 or keys.shape[1] != dim:
            raise ValueError(f"keys have shape {keys.shape}, expected (N, {dim})")
        bank = MemoryBank(keys, arrays["items"], arrays["users"], arrays["prefix_lens"], arrays.get("recent"))
        return bank, arrays.get("first_items")
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable memory bank ({e})") from None


def read_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A model directory's ``config.json`` (its version, dataset, ``data_until``, …), without its weights."""
    config: dict[str, Any] = _read_json(Path(model_dir) / CONFIG_FILE)
    return config


def model_version(model_dir: str | os.PathLike[str]) -> str:
    """The version a model directory holds, read without loading its weights."""
    version: str = read_config(model_dir).get("model_version", "")
    return version


def load(model_dir: str | os.PathLike[str], device: str = "cpu") -> Artifact:
    root = Path(model_dir)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a model directory")
    config = _read_json(root / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{root / CONFIG_FILE}: unsupported format_version (expected {FORMAT_VERSION})")
    try:
        enc_cfg = EncoderConfig(**config["encoder"])
        vocab = Vocab.from_json(_read_json(root / VOCAB_FILE))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{root}: inconsistent config or vocab ({e})") from None
    if vocab.n_items != enc_cfg.n_items:
        raise ArtifactError(
            f"{root / VOCAB_FILE}: {vocab.n_items} items, but the encoder expects {enc_cfg.n_items}"
        )
    encoder = _load_weights(root / WEIGHTS_FILE, SASRec(enc_cfg), "encoder").to(torch.device(device))
    fusion, bank, first_items = None, None, None
    if "fusion" in config:
        try:
            fusion_cfg = FusionConfig(**config["fusion"])
        except TypeError as e:
            raise ArtifactError(f"{root / CONFIG_FILE}: bad fusion config ({e})") from None
        fusion = _load_weights(root / FUSION_FILE, RetrievalFusion(fusion_cfg), "fusion").to(
            torch.device(device)
        )
        bank, first_items = _load_bank(root / MEMORY_FILE, enc_cfg.dim)
        if bank.items.max(initial=0) > vocab.n_items or bank.users.max(initial=0) >= max(len(vocab.users), 1):
            raise ArtifactError(f"{root / MEMORY_FILE}: memory ids outside the vocabulary")
        if (
            bank.recent is not None
            and not 0 <= bank.recent.min(initial=0) <= bank.recent.max(initial=0) <= vocab.n_items
        ):
            raise ArtifactError(f"{root / MEMORY_FILE}: prefix items outside the vocabulary")
        if first_items is not None and (
            first_items.shape != (len(vocab.users),)
            or first_items.min(initial=0) < 0
            or first_items.max(initial=0) > vocab.n_items
        ):
            raise ArtifactError(f"{root / MEMORY_FILE}: first items do not match the vocabulary")
    return Artifact(
        encoder=encoder,
        vocab=vocab,
        dataset=config.get("dataset", ""),
        model_version=config.get("model_version", ""),
        train_config=config.get("train", {}),
        metrics=config.get("metrics", {}),
        fusion=fusion,
        bank=bank,
        first_items=first_items,
        finetune_config=config.get("finetune", {}),
        inference=_read_json(root / INFERENCE_FILE) if (root / INFERENCE_FILE).is_file() else {},
        dataset_file=config.get("dataset_file", ""),
        data_until=config.get("data_until"),
    )
