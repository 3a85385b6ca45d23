"""The zoo's design: two tasks, ten hyperparameter axes, and runs that differ from a base in one axis.

Jiang et al. (ICLR 2020) score a generalisation measure by Kendall's τ against the
generalisation gap over a zoo of networks, and *granulated* over each hyperparameter axis:
τ among models that differ in that axis only, averaged over the others (their Ψ). A full grid
of ten two-valued axes is 1,024 cells per task; this design keeps the granulated comparison
exact with far fewer runs: ``bases`` random base configurations per task, each trained as is
and with each axis flipped in turn (1 + 10 runs per base, every flip a pair that differs in one
axis only), each with ``seeds`` seeds. Bases are split in halves: the first half ("tune") may be
used to choose a measure's direction or setting, the second ("eval") only to score it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace

#: each axis's two values (the first is not a default: bases draw either)
AXES: dict[str, tuple] = {
    "lr": ("low", "high"),  # per optimiser: momentum 0.02 / 0.1, Adam 1e-3 / 5e-3
    "batch_size": (32, 256),
    "width": (32, 128),
    "depth": (1, 3),
    "weight_decay": (0.0, 5e-4),
    "dropout": (0.0, 0.25),
    "optimizer": ("momentum", "adam"),
    "label_noise": (0.0, 0.2),
    "augment": (False, True),
    "clip": (None, 1.0),
}
LR = {("momentum", "low"): 0.02, ("momentum", "high"): 0.1, ("adam", "low"): 1e-3, ("adam", "high"): 5e-3}
TASKS = ("digits", "synthetic")


@dataclass(frozen=True)
class RunConfig:
    """One network of the zoo: a task, a value on every axis, a seed, and where it sits in the design."""

    task: str
    lr: str
    batch_size: int
    width: int
    depth: int
    weight_decay: float
    dropout: float
    optimizer: str
    label_noise: float
    augment: bool
    clip: float | None
    seed: int
    base: int  # the base configuration this run belongs to
    flipped: str | None  # the axis flipped from the base (None: the base itself)
    epochs: int = 20

    @property
    def learning_rate(self) -> float:
        return LR[(self.optimizer, self.lr)]

    @property
    def cell(self) -> str:
        """The hyperparameter cell (everything but the seed and the design bookkeeping)."""
        d = {k: getattr(self, k) for k in ("task", *AXES, "epochs")}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        return f"{self.task}_b{self.base:02d}_{self.flipped or 'base'}_s{self.seed}_{self.cell}"

    @property
    def half(self) -> str:
        """``"tune"`` for the first half of each task's bases, ``"eval"`` for the second."""
        return "tune" if self.base % 2 == 0 else "eval"

    def to_dict(self) -> dict:
        return asdict(self) | {
            "learning_rate": self.learning_rate,
            "cell": self.cell,
            "name": self.name,
            "half": self.half,
        }


def design(bases: int, seeds: int, epochs: int = 20, axes: tuple[str, ...] = tuple(AXES)) -> list[RunConfig]:
    """Every run: per task, ``bases`` random bases (seeded), each as is and with each of ``axes`` flipped."""
    runs = []
    for task in TASKS:
        rng = random.Random(f"hesd-zoo-{task}")
        for b in range(bases):
            base = {k: rng.choice(v) for k, v in AXES.items()}
            variants = [(None, base)] + [(a, base | {a: AXES[a][1 - AXES[a].index(base[a])]}) for a in axes]
            for flipped, values in variants:
                for seed in range(seeds):
                    runs.append(RunConfig(task=task, seed=seed, base=b, flipped=flipped, epochs=epochs, **values))
    return runs


def pairs(runs: list[RunConfig]) -> list[tuple[str, RunConfig, RunConfig]]:
    """``(axis, base run, flipped run)`` for every run that flips one axis (same task, base and seed)."""
    index = {(r.task, r.base, r.seed): r for r in runs if r.flipped is None}
    return [
        (r.flipped, index[(r.task, r.base, r.seed)], r)
        for r in runs
        if r.flipped is not None and (r.task, r.base, r.seed) in index
    ]


def quick(run: RunConfig) -> RunConfig:
    """The CI variant of a run: few epochs."""
    return replace(run, epochs=3)
