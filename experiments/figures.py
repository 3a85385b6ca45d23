"""Figures for docs/reproduction.md, drawn by hesd's own report code from the experiments' results.

python experiments/figures.py [--out experiments/runs] [--dest docs/figures]
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from common import ROOT, parser

from hesd.interfaces.report import build_report

SERIES = {
    "clip_none": "cnn_momentum_lr0.05_raw_e12_s0",
    "clip_0.01": "cnn_momentum_lr0.05_raw_clip0.01_e12_s0",
    "adahessian_vit_block1": "vit_adahessian_lr0.02_raw_block1_e12_s0",
    "adahessian_vit_block32": "vit_adahessian_lr0.02_raw_block32_e12_s0",
    "overfit_cnn": "cnn_momentum_lr0.05_raw_noise0.2_e30_s0",
    "overfit_mlp": "mlp_momentum_lr0.05_raw_noise0.2_e60_s0",
}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dest", type=Path, default=ROOT.parent / "docs" / "figures")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for label, name in SERIES.items():
            src = args.out / "results" / name
            if (src / "manifest.json").exists():
                (Path(tmp) / label).symlink_to(src.resolve(), target_is_directory=True)
        report = build_report(tmp, Path(tmp) / "report.html", title="hesd reproduction figures")
        args.dest.mkdir(parents=True, exist_ok=True)
        for png in sorted((report.parent / "figures").glob("*.png")):
            shutil.copy(png, args.dest / png.name)
            print(args.dest / png.name)


if __name__ == "__main__":
    main()
