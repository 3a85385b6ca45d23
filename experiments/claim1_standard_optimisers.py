"""Claim 1: standard optimisers give mainly-positive HESDs (Ct > -0.6) across data and preprocessing.

Models (MLP, BatchNorm CNN, ResNet-style with BatchNorm, tiny ViT) x optimisers (SGD, SGD
with momentum, Adam, AdamW) on the digits; preprocessing/augmentation variants for the MLP
and the CNN. Every trained checkpoint (epoch > 0) of every seed is classified MP or MN.
"""

from __future__ import annotations

import pandas as pd
from common import Config, elapsed, run_configs, save_table, summarise

LR = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "adamw": 1e-3}


def configs(quick: bool, seeds: int) -> list[Config]:
    if quick:
        return [Config(model="mlp", optimizer=o, lr=LR[o], epochs=3, save_every=1, seed=0) for o in ("sgd", "adam")]
    out = []
    for s in range(seeds):
        for m in ("mlp", "cnn", "resnet", "vit"):
            for o in LR:
                out.append(Config(model=m, optimizer=o, lr=LR[o], epochs=12, save_every=4, seed=s))
        for m in ("mlp", "cnn"):
            for o in ("momentum", "adam"):
                for d in ("standardized", "augmented"):
                    out.append(Config(model=m, optimizer=o, lr=LR[o], data=d, epochs=12, save_every=4, seed=s))
    return out


def main() -> None:
    args, _, tables, t0 = run_configs(__doc__, configs, default_seeds=3)
    summary = summarise(tables, ["model", "optimizer", "data"])
    save_table(summary, args.out / "tables", "claim1")
    save_table(pd.concat(tables), args.out / "tables", "claim1_checkpoints")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    mp, total = int(summary["MP"].sum()), int(summary["checkpoints"].sum())
    print(f"\nclaim 1: {mp} of {total} trained checkpoints are MP ({mp / total:.1%}); {elapsed(t0)}")


if __name__ == "__main__":
    main()
