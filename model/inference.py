"""How a trained model scores: its inference config, frozen in the model directory as ``inference.json``
and read by the predictor alone (model.predictor). Training writes it once, with the values tuning chose
(model.tuning); nothing changes it afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from model import hybrid as hy
from model import transitions as tr
from model import vote as vt
from model.adaptive import AdaptiveKConfig
from model.artifact import Artifact, ArtifactError


@dataclass(frozen=True)
class InferenceConfig:
    """How a trained model scores: frozen in the model directory (``inference.json``)."""

    k: int = 20  # memories the fusion reads per query
    fetch_factor: int = 4  # candidates fetched per kept memory where a rule may drop some
    adaptive_k: bool = False  # RAMRec's entropy rule picks K ≤ k per query
    k_min: int = 3
    cross_user: bool = False  # other users' memories only
    user_memories: bool = False  # the user's own memories (RAMRec) join the fused ones
    vote: vt.Vote = field(default_factory=vt.Vote)
    transitions: tr.TransitionMix = field(default_factory=tr.TransitionMix)
    hybrid: hy.Hybrid | None = None  # learned per-query weights of the sources; replaces the channel's λ

    def __post_init__(self) -> None:
        if self.k < 0 or self.fetch_factor < 1 or not 1 <= self.k_min:
            raise ValueError(f"k ≥ 0, fetch_factor ≥ 1 and k_min ≥ 1 are required, got {self}")

    @property
    def depth(self) -> int:
        """Memories a query uses: the fusion's k, or more when more vote."""
        return max(self.k, self.vote.depth if self.vote.on else 0)

    @property
    def reads_transitions(self) -> bool:
        """Whether scoring reads the follower rows: the channel is on, or the hybrid weighs them."""
        return self.transitions.on or self.hybrid is not None

    @property
    def transition_order(self) -> int:
        """The order the follower rows are read at: the hybrid reads every position and lag."""
        return tr.MAX_ORDER if self.hybrid is not None else self.transitions.order

    def adaptive(self) -> AdaptiveKConfig | None:
        return AdaptiveKConfig(k_base=self.k, k_min=self.k_min, k_max=self.k) if self.adaptive_k else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["hybrid"] = self.hybrid.to_json() if self.hybrid is not None else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InferenceConfig:
        fields = dict(data)
        vote = vt.Vote(**fields.pop("vote", {}))
        transitions = tr.TransitionMix(**fields.pop("transitions", {}))
        hybrid = fields.pop("hybrid", None)
        return cls(
            **fields,
            vote=vote,
            transitions=transitions,
            hybrid=hy.Hybrid.from_json(hybrid) if hybrid else None,
        )


LEGACY_KEYS = ("k", "fetch_factor", "adaptive_k", "k_min", "cross_user", "user_memories")


def inference_config(art: Artifact) -> InferenceConfig:
    """The model directory's inference config; a model without a fusion module scores with its encoder
    alone (k = 0). Directories written before ``inference.json`` hold it in their fine-tune config."""
    if art.fusion is None:
        return InferenceConfig(k=0)
    try:
        if art.inference:
            return InferenceConfig.from_json(art.inference)
        ft = art.finetune_config
        if ft.get("retrieval", "similarity") != "similarity":
            raise ValueError(f"fine-tuned with --retrieval {ft['retrieval']}, a benchmark control")
        return InferenceConfig(
            **{key: ft[key] for key in LEGACY_KEYS if key in ft},
            vote=vt.Vote(
                ft.get("vote_weight", 0.0), ft.get("vote_temperature", 0.05), ft.get("vote_depth", 0)
            ),
            transitions=tr.TransitionMix(
                ft.get("transition_weight", 0.0), ft.get("transition_order", tr.MAX_ORDER)
            ),
        )
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"model {art.model_version}: bad inference config ({e})") from None
