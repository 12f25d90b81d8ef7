"""An Optuna search's study, kept in a SQL store so that re-running the command continues it.

``hparams_search=optuna_simpo`` stores its study in ``sqlite:///<launch dir>/optuna.db`` (any
SQLAlchemy URL works, e.g. the tracking database's server), where ``optuna-dashboard`` reads it.
Hydra's Optuna sweeper loads a study that exists (``load_if_exists``) and then asks for
``n_trials`` *more* trials on every command. A search is sized by its study instead:
``objective.n_trials`` is how many complete trials the study should hold, and the sweeper's
``n_trials`` is what is missing (:func:`trials_to_go`, a resolver), and the sampler's seed moves
on with the study (:func:`sampler_seed`). Only COMPLETE trials count,
as in Optuna's own ``MaxTrialsCallback``: a failed trial (a non-finite loss, a rejected config,
an interrupted job) is tried again by the next command.

A command stopped by Ctrl-C or SIGTERM (or a failed job) leaves the trial it was running in the
RUNNING state, since the sweeper tells Optuna nothing on its way out; :func:`fail_unfinished`
marks those FAIL, so the study holds no trial that will never end.

Optuna is imported here only, and only when a search uses a stored study.
"""

from __future__ import annotations

import datetime
import logging
from typing import Optional

log = logging.getLogger(__name__)


def shown(storage: Optional[str]) -> Optional[str]:
    """A storage URL fit for logs and MLflow params: its password, if any, masked."""
    if not storage or "@" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show nothing of it
        return "<unparsable URL>"


def _study(storage: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created..." is the sweeper's to say
    if name not in optuna.study.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def complete_trials(storage: str, name: str) -> int:
    """How many COMPLETE trials study ``name`` in ``storage`` holds (0 if it does not exist yet)."""
    import optuna

    study = _study(storage, name)
    if study is None:
        return 0
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def trials_to_go(storage: Optional[str], name: str, size: int) -> int:
    """The trials this command runs: what the study lacks of ``size`` complete trials (all of them
    for a study in memory, ``storage`` null, which every command starts afresh)."""
    if storage is None:
        return size
    done = complete_trials(storage, name)
    to_go = max(0, size - done)
    if done:
        log.info("Optuna study %s in %s holds %d of %d complete trials: running %d more", name, shown(storage), done,
                 size, to_go)
    if to_go == 0:
        log.warning("Optuna study %s is complete (%d trials): nothing to run. Raise objective.n_trials to "
                    "extend it, or name a new study with hydra.sweeper.study_name=...", name, done)
    return to_go


def sampler_seed(seed: Optional[int], storage: Optional[str], name: str) -> Optional[int]:
    """The sampler's seed for this command: ``seed`` plus the trials the study already holds.

    TPE draws its first ``n_startup_trials`` at random from its seed, whatever the study holds: a
    resumed command seeded as the first would propose the first command's points again. Offset by
    the study's length, the seed still makes a search reproducible, command by command.
    """
    if seed is None or storage is None:
        return seed
    found = _study(storage, name)
    return seed + (len(found.get_trials(deepcopy=False)) if found is not None else 0)


def fail_unfinished(storage: str, name: str, since: datetime.datetime) -> list[int]:
    """Mark FAIL the trials of study ``name`` that started at or after ``since`` and are still
    RUNNING (this command's, when it stops early); their numbers."""
    import optuna

    study = _study(storage, name)
    if study is None:
        return []
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    numbers = [t.number for t in running if t.datetime_start is not None and t.datetime_start >= since]
    for number in numbers:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    if numbers:
        log.warning("Optuna study %s: trial(s) %s did not finish and are marked FAIL; re-run the command to "
                    "continue the study", name, ", ".join(map(str, numbers)))
    return numbers
