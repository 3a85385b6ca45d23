"""Claim 2: gradient manipulation outside the loss (clipping, AdaHessian's averaging) gives MN-HESDs.

Dose-response: gradient-norm clipping threshold (CNN, SGD with momentum) and AdaHessian's
Hessian-diagonal averaging block size (tiny ViT and CNN) against Ct, with where the HESD
flips type. AdaHessian comes from pytorch-optimizer; its averaging is applied here
explicitly (that package's AdaHessian does not average), see common._averaged_hessian_diag.
"""

from __future__ import annotations

import pandas as pd
from common import Config, elapsed, run_configs, save_table, summarise

CLIPS = [None, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001]
BLOCKS = [1, 8, 32]


def configs(quick: bool, seeds: int) -> list[Config]:
    if quick:
        return [Config(model="mlp", clip=c, epochs=3, save_every=1) for c in (None, 0.01)] + [
            Config(model="mlp", optimizer="adahessian", lr=0.05, block=8, epochs=2, save_every=1)
        ]
    out = []
    for s in range(seeds):
        out += [Config(model="cnn", clip=c, epochs=12, save_every=4, seed=s) for c in CLIPS]
        for m, lr in (("vit", 0.02), ("cnn", 0.05)):
            out += [Config(model=m, optimizer="adahessian", lr=lr, block=b, epochs=12, save_every=4, seed=s)
                    for b in BLOCKS]  # fmt: skip
    return out


def main() -> None:
    args, _, tables, t0 = run_configs(__doc__, configs, default_seeds=3)
    all_t = pd.concat(tables, ignore_index=True)
    all_t["clip"] = all_t["clip"].fillna(float("inf"))
    clip = summarise([all_t[all_t["optimizer"] != "adahessian"]], ["model", "clip"])
    ada = summarise([all_t[all_t["optimizer"] == "adahessian"]], ["model", "block"])
    save_table(clip, args.out / "tables", "claim2_clipping")
    save_table(ada, args.out / "tables", "claim2_adahessian")
    save_table(all_t, args.out / "tables", "claim2_checkpoints")
    print("clipping threshold vs Ct\n" + clip.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nAdaHessian averaging block vs Ct\n" + ada.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{elapsed(t0)}")


if __name__ == "__main__":
    main()
