"""What happens to evicted tokens: summaries by name, one per file behind one interface
(`base.Summary`: plan, summarise; a state's fold).

A new summary is one file here and one line in `_REGISTRY`.
"""

from __future__ import annotations

from .base import DEFAULT_STATE_BUDGET, ClusterSummary, LayerPlan, Summarised, Summary, SummaryState
from .cam import CAM
from .exact import Exact, ExactState, Linear, LinearState
from .fitted import Fitted
from .learned import Learned, LearnedFeatures
from .merge import Merge
from .taylor import SeedTaylor, Taylor
from .variance import MergeVariance

_REGISTRY: dict[str, tuple[type[ClusterSummary], dict] | None] = {
    "none": None,  # evicted tokens are dropped
    "merge": (Merge, {}),
    "merge_calibrated": (Merge, {"calibrate": True}),
    "merge_variance": (MergeVariance, {}),
    "taylor1": (Taylor, {"order": 1}),
    "taylor2": (Taylor, {"order": 2, "pairs": "full"}),
    "taylor2_diag": (Taylor, {"order": 2, "pairs": "diag"}),
    "taylor2_lowrank": (Taylor, {"order": 2, "pairs": "full", "rank": 4}),
    "seed_taylor": (SeedTaylor, {}),
    "learned": (Learned, {}),
    "fitted": (Fitted, {}),
    "cam": (CAM, {}),
}
SUMMARIES = tuple(_REGISTRY)
ALIASES = {"ratchetkv": "seed_taylor"}  # the seed repository's name for its state


def canonical_summary(name: str) -> str:
    """'Merge' -> 'merge', 'ratchetkv' -> 'seed_taylor'; an unknown name raises, naming the allowed ones."""
    canonical = ALIASES.get(str(name).lower(), str(name).lower())
    if canonical not in _REGISTRY:
        raise ValueError(f"unknown summary {name!r}; choose one of: {', '.join(SUMMARIES)}")
    return canonical


def refits_kept(name: str) -> bool:
    """Whether the summary of this name refits the kept slots (zero extra memory, no clusters)."""
    entry = _REGISTRY[canonical_summary(name)]
    return entry is not None and entry[0].refits_kept


def build_summary(summary, state_budget=None, cluster_by=None, rank=None, summary_path=None, route=None,
                  spike_threshold=None, concentration=None, fit_kept=None) -> Summary | None:
    """A summary object by name (None for "none"); a `Summary` object passes through unchanged.
    route, spike_threshold, concentration, fit_kept: see `ClusterSummary` (the thresholds only with route=True)."""
    cluster_options = (("state_budget", state_budget), ("cluster_by", cluster_by), ("route", route),
                       ("spike_threshold", spike_threshold), ("concentration", concentration), ("fit_kept", fit_kept))
    if summary is None or isinstance(summary, Summary):
        for flag, value in (*cluster_options, ("rank", rank), ("summary_path", summary_path)):
            if value is not None:
                raise ValueError(f"{flag} applies to a summary named by a string; "
                                 f"{'no summary is set' if summary is None else 'set it on the summary object'}")
        return summary
    if not isinstance(summary, str):
        raise ValueError(f"summary must be a name ({', '.join(SUMMARIES)}) or a Summary object, got {summary!r}")
    name = canonical_summary(summary)
    if _REGISTRY[name] is None:  # "none": eviction, whatever the summary options say
        return None
    cls, options = _REGISTRY[name]
    options = dict(options)
    for field, value in cluster_options:
        if value is not None:
            if not issubclass(cls, ClusterSummary):  # fitted, cam: no share of memory, no clusters
                raise ValueError(f"{field} applies to the cluster summaries, not {name!r}")
            options[field] = value
    for field, value in (("spike_threshold", spike_threshold), ("concentration", concentration)):
        if value is not None and route is not True:
            raise ValueError(f"{field} applies with route=True (routing), got route={route!r}")
    if rank is not None:
        if name != "taylor2_lowrank":
            raise ValueError(f"rank applies to summary taylor2_lowrank, not {name!r}")
        options["rank"] = rank
    if summary_path is not None:
        if name != "learned":
            raise ValueError(f"summary_path applies to summary learned, not {name!r}")
        options["path"] = str(summary_path)
    return cls(**options)


__all__ = [
    "CAM", "DEFAULT_STATE_BUDGET", "SUMMARIES", "ClusterSummary", "Exact", "ExactState", "LayerPlan", "Learned",
    "LearnedFeatures", "Linear", "LinearState", "Merge", "MergeVariance", "SeedTaylor", "Summarised", "Summary",
    "SummaryState", "Taylor", "build_summary", "canonical_summary", "Fitted",
]
