"""Analysis: HESD criteria and type, quasi-singular detection, checkpoint series and selection."""

from .blocks import analyze_blocks, default_blocks
from .checkpoints import apply_state_dict, discover_checkpoints, load_state_dict, parse_epoch, sha256_file
from .criteria import Criteria, compare_criteria, criteria, per_probe_criteria, zero_mass
from .selection import (
    BestHeldout,
    HighestCtAmongMP,
    QSRule,
    Selection,
    SelectionRule,
    SmallestLambdaMax,
    default_rules,
    select_all,
)
from .series import AnalysisSettings, SeriesResult, analyze_checkpoints, analyze_model, build_table
from .store import ResultStore, SettingsMismatchError

__all__ = [
    "AnalysisSettings",
    "BestHeldout",
    "Criteria",
    "HighestCtAmongMP",
    "QSRule",
    "ResultStore",
    "Selection",
    "SelectionRule",
    "SeriesResult",
    "SettingsMismatchError",
    "SmallestLambdaMax",
    "analyze_blocks",
    "analyze_checkpoints",
    "analyze_model",
    "apply_state_dict",
    "build_table",
    "compare_criteria",
    "criteria",
    "default_blocks",
    "default_rules",
    "discover_checkpoints",
    "load_state_dict",
    "parse_epoch",
    "per_probe_criteria",
    "select_all",
    "sha256_file",
    "zero_mass",
]
