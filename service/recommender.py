"""The model the service serves: the predictor of a model directory (model.predictor), checked for what
the request path can read. Scoring itself is the predictor's, shared with the offline evaluator."""

from __future__ import annotations

from model.artifact import Artifact, ArtifactError
from model.predictor import Predictor, from_artifact


def serving_predictor(art: Artifact, frozen: bool = True, new_item_weight: float = 1.0) -> Predictor:
    """The artifact's predictor, with frozen graphs when ``frozen`` and the transition counts of items
    registered after training weighted ``new_item_weight``; a model the service would answer
    differently from its evaluation is refused with an :class:`ArtifactError` that says why."""
    retrieval = art.train_config.get("retrieval", "similarity")
    if retrieval != "similarity":
        # A benchmark control (bench.controls): its fusion learned from memories the service never fetches.
        raise ArtifactError(
            f"model {art.model_version} is a benchmark control (memories retrieved: {retrieval}, "
            "python -m bench.controls), not a model to serve; serve a model trained by memrec train"
        )
    predictor = from_artifact(art, frozen, new_item_weight)
    cfg = predictor.cfg
    if cfg.user_memories and art.first_items is None:
        # Its users' memories are replayed from their first item on (service.bank.load_user_memories).
        raise ArtifactError(
            f"model {art.model_version} fuses per-user memories but keeps no first items, from which "
            "its users' memories are replayed; train it again"
        )
    if cfg.reads_transitions and (art.bank is None or art.bank.recent is None):
        raise ArtifactError(
            f"model {art.model_version} mixes item transitions, but its memory bank has no prefix items"
        )
    return predictor
