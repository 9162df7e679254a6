"""The server's progress after each finished round, kept so that a server restarted after a crash
resumes from there (`lungxray federate server --resume`).

One file, `RUN/federation/checkpoint.npz`, replaced whole after every round: the global head the
next round starts from (as the strategy holds it: FedAdam's in float64), what Flower's strategy
carries between rounds (FedAvgM's momentum, FedAdam's moments), the rounds' history, the sites, and
the privacy accountant's ledger. The same head, state and seeds make the same next round as a server
that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lungxray.io import atomic_path

CHECKPOINT = "checkpoint.npz"
STRATEGY_STATE = ("momentum_vector", "m_t", "v_t")  # what Flower's FedAvgM and FedOpt keep between rounds


@dataclasses.dataclass
class Checkpoint:
    round: int
    head: list[np.ndarray]
    strategy_state: dict[str, np.ndarray]  # "momentum_vector/0", "m_t/<array key>", ...
    history: list[dict]
    roster: list[dict]
    resumed_after: list[int]  # the rounds after which earlier restarts resumed
    privacy: dict | None  # the accountant's state_dict, with differential privacy

    def save(self, folder: Path) -> None:
        progress = json.dumps({"round": self.round, "history": self.history, "roster": self.roster,
                               "resumed_after": self.resumed_after, "privacy": self.privacy})
        arrays = {f"head/{i}": w for i, w in enumerate(self.head)} | self.strategy_state
        with atomic_path(folder / CHECKPOINT) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, progress=np.array(progress), **arrays)

    @classmethod
    def load(cls, folder: Path) -> "Checkpoint | None":
        """The last finished round's checkpoint, or None before the first."""
        if not (folder / CHECKPOINT).exists():
            return None
        with np.load(folder / CHECKPOINT) as stored:
            progress = json.loads(str(stored["progress"]))
            head = [stored[f"head/{i}"] for i in range(sum(name.startswith("head/") for name in stored.files))]
            state = {name: stored[name] for name in stored.files if name.split("/")[0] in STRATEGY_STATE}
        return cls(progress["round"], head, state, progress["history"], progress["roster"],
                   progress["resumed_after"], progress["privacy"])


def strategy_state(strategy) -> dict[str, np.ndarray]:
    """What `strategy` (or the strategy a differential-privacy wrapper holds) carries between rounds."""
    inner = getattr(strategy, "strategy", strategy)
    state = {}
    for name in STRATEGY_STATE:
        value = getattr(inner, name, None) or {}
        for key, array in (value.items() if isinstance(value, dict) else enumerate(value)):
            state[f"{name}/{key}"] = np.asarray(array)
    return state


def restore_strategy(strategy, state: dict[str, np.ndarray]) -> None:
    """Give `strategy` back what `strategy_state` took from it."""
    inner = getattr(strategy, "strategy", strategy)
    for name in STRATEGY_STATE:
        kept = {key.split("/", 1)[1]: array for key, array in state.items() if key.split("/")[0] == name}
        if kept:
            setattr(inner, name, list(kept.values()) if name == "momentum_vector" else kept)
