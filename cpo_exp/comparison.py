"""Which configuration of a sweep won, by how much, and how sure: statistics over seeds.

Jobs that differ only in their seed (``train.seed``) are repeats of one configuration. For each
configuration and metric: ``n`` (finished jobs that logged it), mean, sample standard deviation
and a two-sided confidence interval of the mean from Student's t distribution with ``n - 1``
degrees of freedom (the right one for the few seeds a sweep affords; it widens as ``n`` shrinks,
and there is none for ``n = 1``). Against a baseline configuration: the paired difference over
the seeds both have (each seed's value minus the baseline's with the same seed, which removes
what the seed does to both), its mean and t interval, and a plain verdict: ``better`` or
``worse`` when the interval excludes 0, ``no clear difference`` when it covers 0.

Pure functions of plain values: no MLflow, no plotting (see :mod:`cpo_exp.report`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

from cpo_exp.config import parse_override

SEED_KEY = "train.seed"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values, their sample standard deviation, and the t interval of the mean."""

    n: int
    mean: float
    std: Optional[float] = None  # None for n < 2
    low: Optional[float] = None
    high: Optional[float] = None

    def covers(self, value: float) -> bool:
        return self.low is not None and self.low <= value <= self.high


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Optional[Interval]:
    """The Student-t interval of the mean of ``values`` (None when there are none)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return None
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(n, mean)
    from scipy.stats import t

    std = statistics.stdev(values)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Job:
    """One job of a sweep as the comparison sees it."""

    overrides: dict[str, str]  # the swept values that define it (its seed among them, if swept)
    metrics: dict[str, float]
    finished: bool = True
    run_id: Optional[str] = None  # where its curves are (the report reads them); not compared

    @property
    def seed(self) -> Optional[str]:
        return self.overrides.get(SEED_KEY)

    @property
    def config(self) -> tuple[tuple[str, str], ...]:
        """Everything but the seed: the jobs of one configuration share it."""
        return tuple((k, v) for k, v in self.overrides.items() if k != SEED_KEY)


@dataclass
class ConfigSummary:
    """One configuration: its jobs and, per metric, the interval over its finished seeds."""

    config: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)
    intervals: dict[str, Optional[Interval]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.config) or "default"

    @property
    def n_jobs(self) -> int:
        """All its jobs, finished or not: the denominator of the report's ``n`` ("2/3")."""
        return len(self.jobs)

    def values(self, metric: str) -> dict[Optional[str], float]:
        """The metric of each finished job, by seed."""
        return {j.seed: j.metrics[metric] for j in self.jobs if j.finished and metric in j.metrics
                and math.isfinite(j.metrics[metric])}


def summarize(jobs: Sequence[Job], metrics: Sequence[str], confidence: float = CONFIDENCE) -> list[ConfigSummary]:
    """The configurations of ``jobs`` in order of first appearance, each with its intervals."""
    groups: dict[tuple, ConfigSummary] = {}
    for job in jobs:
        groups.setdefault(job.config, ConfigSummary(job.config)).jobs.append(job)
    for summary in groups.values():
        summary.intervals = {m: t_interval(list(summary.values(m).values()), confidence) for m in metrics}
    return list(groups.values())


def find_baseline(summaries: Sequence[ConfigSummary], spec: Optional[str]) -> Optional[ConfigSummary]:
    """The configuration named by ``spec`` (``"loss=sigmoid,beta=0.1"``: every pair must match), or
    the first one; a ValueError naming the configurations when ``spec`` matches none or several."""
    if not summaries:
        return None
    if not spec:
        return summaries[0]
    wanted = dict(p for p in map(parse_override, spec.split(",")) if p)
    if not wanted:
        raise ValueError(f"report.baseline={spec!r} is not a configuration: write its swept values as "
                         "key=value pairs separated by commas, e.g. loss=sigmoid,beta=0.1")
    found = [s for s in summaries if all(_same_value(dict(s.config).get(k), v) for k, v in wanted.items())]
    if len(found) != 1:
        raise ValueError(f"report.baseline={spec!r} matches {len(found)} configurations; one of: "
                         + "; ".join(s.label for s in summaries))
    return found[0]


def _same_value(have: Optional[str], want: str) -> bool:
    """``beta=2`` names the jobs of ``beta=2.0``, ``save=false`` those of Hydra's ``save=False``."""
    if have is None:
        return False
    if have == want or have.lower() == want.lower():
        return True
    try:
        return float(have) == float(want)
    except ValueError:
        return False


@dataclass(frozen=True)
class Difference:
    """A configuration minus the baseline, paired by seed, and what it says."""

    interval: Optional[Interval]
    verdict: str


def paired_difference(candidate: ConfigSummary, baseline: ConfigSummary, metric: str, direction: str,
                      confidence: float = CONFIDENCE) -> Difference:
    """Mean and t interval of ``candidate - baseline`` over the seeds both finished, and the verdict
    (``maximize``: a positive difference is ``better``)."""
    ours, theirs = candidate.values(metric), baseline.values(metric)
    shared = [seed for seed in ours if seed in theirs]
    interval = t_interval([ours[s] - theirs[s] for s in shared], confidence)
    if interval is None or interval.low is None:
        return Difference(interval, f"n={interval.n if interval else 0}: too few shared seeds")
    if interval.covers(0.0):
        return Difference(interval, "no clear difference")
    up = interval.low > 0
    return Difference(interval, "better" if up == (direction == "maximize") else "worse")


def best_config(summaries: Sequence[ConfigSummary], metric: str, direction: str) -> Optional[ConfigSummary]:
    """The configuration with the best mean of ``metric`` (the first of equals), or None when none has one."""
    scored = [s for s in summaries if s.intervals.get(metric) is not None]
    if not scored:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    return max(scored, key=lambda s: sign * s.intervals[metric].mean)


@dataclass
class Comparison:
    """A sweep's configurations, their baseline, the paired differences on the objective, the best."""

    objective: str
    direction: str
    confidence: float
    metrics: list[str]  # the objective first
    summaries: list[ConfigSummary]
    baseline: Optional[ConfigSummary]
    baseline_error: str  # why there is no baseline (a spec that matches none), else ""
    differences: dict[tuple, Difference]  # by configuration; none for the baseline itself
    best: Optional[ConfigSummary]


def compare(jobs: Sequence[Job], objective: str, direction: str, metrics: Sequence[str] = (),
            baseline: Optional[str] = None, confidence: float = CONFIDENCE) -> Comparison:
    """Everything the report says about ``jobs`` over seeds. A ``baseline`` that names no single
    configuration is no error here: the comparison has no differences and says why."""
    metrics = list(dict.fromkeys([objective, *metrics]))
    summaries = summarize(jobs, metrics, confidence)
    try:
        base, error = find_baseline(summaries, baseline), ""
    except ValueError as err:
        base, error = None, str(err)
    differences = {} if base is None else {
        s.config: paired_difference(s, base, objective, direction, confidence) for s in summaries if s is not base}
    return Comparison(objective, direction, confidence, metrics, summaries, base, error, differences,
                      best_config(summaries, objective, direction))
