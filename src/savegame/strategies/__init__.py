"""Pure policy: when to save, what to keep, what to resume from, when to restart. No I/O."""
from savegame.strategies.metrics import is_better, rank_by_metric, resolve_mode
from savegame.strategies.regimes import DEFAULT_REGIME, REGIMES
from savegame.strategies.restart import Decision, Failure, RestartPolicy, decide
from savegame.strategies.retention import (AnyOf, KeepBest, KeepEvery, KeepLast, KeepThinning,
                                           RetentionPlan, ThinningTier, plan_retention)
from savegame.strategies.schedule import (AnySchedule, EveryNEpochs, EveryNSeconds, EveryNSteps, History,
                                          Moment, OnImprovement, next_history)
from savegame.strategies.selection import RESUME_CHOICES, resume_candidates

__all__ = ["AnyOf", "AnySchedule", "DEFAULT_REGIME", "Decision", "EveryNEpochs", "EveryNSeconds",
           "EveryNSteps", "Failure", "History", "KeepBest", "KeepEvery", "KeepLast", "KeepThinning", "Moment",
           "OnImprovement", "REGIMES", "RESUME_CHOICES", "RestartPolicy", "RetentionPlan", "ThinningTier",
           "decide", "is_better", "next_history", "plan_retention", "rank_by_metric", "resolve_mode",
           "resume_candidates"]
