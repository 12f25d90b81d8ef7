"""The stored Optuna study of a search (cpo_exp.study): its size counts COMPLETE trials, trials an
interrupted command left running are failed, a resumed command draws new points, and a study that
cannot be opened is one line naming the storage. Real SQLite studies; the CLI runs are in
test_sweeps.py."""

from __future__ import annotations

import datetime

import optuna
import pytest
from optuna.trial import TrialState

from cpo_exp import study
from cpo_exp.cli import study_seed, trials_to_go
from cpo_exp.config import ConfigError


@pytest.fixture
def storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def _study_with(storage: str, states: list[TrialState]) -> optuna.Study:
    created = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for state in states:
        trial = created.ask({"beta": optuna.distributions.FloatDistribution(2.0, 10.0)})
        if state == TrialState.COMPLETE:
            created.tell(trial, 0.5)
        elif state != TrialState.RUNNING:
            created.tell(trial, state=state)
    return created


def test_a_study_that_does_not_exist_yet_runs_all_its_trials(storage):
    assert study.complete_trials(storage, "s") == 0
    assert study.trials_to_go(storage, "s", 5) == 5
    assert study.trials_to_go(None, "s", 5) == 5  # in memory: every command starts afresh


def test_only_complete_trials_count_towards_the_study_size(storage):
    _study_with(storage, [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.RUNNING])
    assert study.complete_trials(storage, "s") == 2
    assert study.trials_to_go(storage, "s", 5) == 3
    assert study.trials_to_go(storage, "s", 2) == 0
    assert study.trials_to_go(storage, "s", 1) == 0


def test_an_interrupted_commands_running_trials_are_failed_and_older_ones_left_alone(storage):
    _study_with(storage, [TrialState.COMPLETE, TrialState.RUNNING])  # trial 1: another command's
    since = datetime.datetime.now()
    loaded = optuna.load_study(study_name="s", storage=storage)
    loaded.ask({"beta": optuna.distributions.FloatDistribution(2.0, 10.0)})  # trial 2: this command's
    assert study.fail_unfinished(storage, "s", since) == [2]
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL]
    assert study.fail_unfinished(storage, "s", since) == []


def test_the_sampler_seed_moves_on_with_the_study(storage):
    assert study.sampler_seed(42, storage, "s") == 42
    _study_with(storage, [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE])
    assert study.sampler_seed(42, storage, "s") == 45  # every trial asked so far, failed ones too
    assert study.sampler_seed(None, storage, "s") is None
    assert study.sampler_seed(42, None, "s") == 42


def test_a_resumed_tpe_search_seeded_as_before_would_repeat_its_first_points(storage):
    """Why the seed moves on: TPE's start-up trials are random draws from its seed alone."""
    space = {"beta": optuna.distributions.FloatDistribution(2.0, 10.0)}

    def draws(seed: int, name: str, n: int) -> list[float]:
        searched = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
        values = []
        for _ in range(n):
            trial = searched.ask(space)
            searched.tell(trial, 0.0)
            values.append(trial.params["beta"])
        return values

    first = draws(42, "same_seed", 2)
    assert draws(42, "same_seed", 2) == first
    moved = draws(study.sampler_seed(42, storage, "moved"), "moved", 2)
    assert draws(study.sampler_seed(42, storage, "moved"), "moved", 2) != moved


def test_a_study_that_cannot_be_opened_is_one_line_naming_the_storage(tmp_path):
    bad = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'optuna.db'}"
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.storage=sqlite:///.*no/such/dir.*cannot be opened"):
        trials_to_go(bad, "s", 5)
    with pytest.raises(ConfigError, match="hydra.sweeper.storage"):
        study_seed(42, bad, "s")
    with pytest.raises(ConfigError, match="objective.n_trials=0"):
        trials_to_go(bad, "s", 0)


def test_a_storage_password_never_reaches_a_log_line():
    shown = study.shown("postgresql://optuna:s3cret@db.example:5432/studies")
    assert "s3cret" not in shown and shown.startswith("postgresql://optuna:***@db.example")
    assert study.shown("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert study.shown(None) is None
