"""Analysis: HESD criteria and type, quasi-singular detection, checkpoint series and selection."""

from .blocks import analyze_blocks, default_blocks
from .checkpoints import apply_state_dict, discover_checkpoints, load_state_dict, parse_epoch, sha256_file
from .criteria import Criteria, compare_criteria, criteria, per_probe_criteria, zero_mass
from .model import analyze_model, select_params
from .recorder import SeriesRecorder
from .rows import COLUMNS, VIEWS, Column, RowIdentity, build_table, records
from .selection import (
    BestHeldout,
    ExtremeOf,
    HighestCtAmongMP,
    QSRule,
    Selection,
    SelectionRule,
    SmallestLambdaMax,
    default_rules,
    select_all,
)
from .series import CheckpointJob, SeriesResult, analyze_checkpoints
from .settings import AnalysisSettings
from .store import ResultStore, SettingsMismatchError

__all__ = [
    "COLUMNS",
    "VIEWS",
    "AnalysisSettings",
    "BestHeldout",
    "CheckpointJob",
    "Column",
    "Criteria",
    "ExtremeOf",
    "HighestCtAmongMP",
    "QSRule",
    "ResultStore",
    "RowIdentity",
    "Selection",
    "SelectionRule",
    "SeriesRecorder",
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
    "records",
    "select_all",
    "select_params",
    "sha256_file",
    "zero_mass",
]
