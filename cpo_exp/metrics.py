"""The one place that decides which metrics exist and what they are called.

Names and definitions are TRL's ``CPOTrainer.get_batch_loss_metrics`` (and, for ORPO's
extra two, ``ORPOTrainer``'s): each value is a mean over one batch, and a logged value is the
mean of the batch values in its logging window. Eval metrics carry the ``eval_`` prefix;
``eval_loss`` alone is weighted by the pairs of each batch, as transformers' evaluation loop
weights it (TRL's other eval metrics are plain means of batch means, so they differ when the
last batch is smaller).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F

PAIR_METRICS = (
    "loss",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)
# The metrics only some losses have, by loss name (given ``log_odds`` in :func:`pair_metrics`).
LOSS_METRICS = {"orpo": ("log_odds_ratio", "log_odds_chosen")}
EVAL_PREFIX = "eval_"
# Eval metrics averaged over the batches weighted by their rows (see the module docstring).
ROW_WEIGHTED_EVAL = ("loss",)


def pair_metrics(
    loss: torch.Tensor,
    nll_loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_logits_mean: torch.Tensor,
    rejected_logits_mean: torch.Tensor,
    log_odds: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Batch means as detached 0-d tensors (no host sync here; see :class:`MetricWindow`).

    ``log_odds``: ORPO's per-pair log odds ratio (``losses.orpo_log_odds``), which adds TRL's
    ``log_odds_ratio`` (the mean of ``log sigmoid(log_odds)``, not scaled by ``beta``) and
    ``log_odds_chosen`` (the mean of ``log_odds``).
    """
    values = {
        "loss": loss,
        "nll_loss": nll_loss,
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
        "logits/chosen": chosen_logits_mean,
        "logits/rejected": rejected_logits_mean,
    }
    if log_odds is not None:
        values["log_odds_ratio"] = F.logsigmoid(log_odds).mean()
        values["log_odds_chosen"] = log_odds.mean()
    return {name: value.detach().float() for name, value in values.items()}


class MetricWindow:
    """Collects per-batch metric tensors and averages them when the window is read.

    Values stay on the device until :meth:`flush`, so a training step never waits for a
    device-to-host copy just to record a metric.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._rows: list[int] = []

    def add(self, metrics: dict[str, torch.Tensor], rows: int = 1) -> None:
        """One batch's values; ``rows`` (its pairs) weighs it in the means named ``row_weighted``."""
        for name, value in metrics.items():
            self._values[name].append(value)
        self._rows.append(rows)

    def state(self) -> dict[str, list[float]]:
        """The unflushed values as floats, for a checkpoint."""
        return {name: torch.stack(values).tolist() for name, values in self._values.items()}

    def load(self, state: dict[str, list[float]], device: torch.device | str = "cpu") -> None:
        for name, values in state.items():
            self._values[name].extend(torch.tensor(v, device=device) for v in values)
        self._rows.extend([1] * max(map(len, state.values()), default=0))  # a train window is never row-weighted

    def flush(self, prefix: str = "", row_weighted: tuple[str, ...] = ()) -> dict[str, float]:
        """The window's means as floats (one host sync), then an empty window.

        Names in ``row_weighted`` are averaged with the batches weighted by their rows."""
        names = list(self._values)
        if not names:
            return {}
        rows = torch.tensor(self._rows, dtype=torch.float32)

        def mean(name: str) -> torch.Tensor:
            values = torch.stack(self._values[name])
            if name not in row_weighted:
                return values.mean()
            return (values * rows.to(values.device)).sum() / rows.sum()

        means = torch.stack([mean(n) for n in names]).tolist()
        self._values.clear()
        self._rows.clear()
        return {prefix + name: mean for name, mean in zip(names, means)}


# Quantiles of the per-pair reward margin logged at each evaluation.
MARGIN_QUANTILES = (0.1, 0.5, 0.9)


def eval_diagnostics(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, margins: torch.Tensor,
                     length_diff: torch.Tensor, start: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                     ) -> dict[str, float]:
    """Per-pair diagnostics of one evaluation over all eval pairs (``[N]`` tensors each).

    - ``margins/p10``, ``p50``, ``p90``: quantiles of the reward margin (``rewards/margins`` is its mean);
    - ``margins/length_corr``: Pearson correlation of a pair's margin with its length difference
      (chosen minus rejected completion tokens): how much of the preference is length;
    - with ``start`` (the same pairs' log-probs at step 0), likelihood displacement:
      ``displacement/chosen_below_start`` (the share of pairs whose chosen log-prob fell below its
      step-0 value), ``displacement/rejected_below_start``, and ``displacement/chosen_change`` /
      ``rejected_change`` (the mean change). Chosen rewards falling together with rejected ones is
      the displacement SimPO and AlphaPO users watch for.
    """
    margins = margins.double()
    quantiles = torch.quantile(margins, torch.tensor(MARGIN_QUANTILES, dtype=torch.float64, device=margins.device))
    out = {f"margins/p{round(100 * q)}": float(v) for q, v in zip(MARGIN_QUANTILES, quantiles)}
    lengths = length_diff.double()
    spread = margins.std(unbiased=False) * lengths.std(unbiased=False)
    centred = ((margins - margins.mean()) * (lengths - lengths.mean())).mean()
    out["margins/length_corr"] = float(centred / spread) if spread > 0 else 0.0
    if start is not None:
        for name, now, then in (("chosen", chosen_logps, start[0]), ("rejected", rejected_logps, start[1])):
            change = (now.double() - then.double().to(now.device))
            out[f"displacement/{name}_below_start"] = float((change < 0).double().mean())
            out[f"displacement/{name}_change"] = float(change.mean())
    return out
