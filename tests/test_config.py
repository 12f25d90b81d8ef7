"""Config composition: every preset of every group composes, impossible values are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cpo_exp.cli import config_dir
from cpo_exp.config import Config, ConfigError, validate

from conftest import REPO, run_cli

SNAPSHOT = REPO / "tests" / "snapshots" / "default_config.yaml"
# Presets that need one value from the user before they validate.
REQUIRED = {
    ("model", "hf"): ["model.name_or_path=/some/model"],
    ("data", "files"): ["data.train_files=[/some/train.jsonl]"],
}


def group_options() -> list[tuple[str, str]]:
    root = Path(config_dir())
    return sorted(
        (group.name, option.stem)
        for group in root.iterdir() if group.is_dir()
        for option in group.glob("*.yaml")
    )


def compose_config(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose("config", overrides=overrides)
    return OmegaConf.to_object(dcfg)


@pytest.mark.parametrize("group,option", group_options(), ids=lambda v: str(v))
def test_every_preset_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    validate(cfg)
    assert isinstance(cfg, Config)


def test_the_groups_the_brief_names_exist():
    groups = {g for g, _ in group_options()}
    assert {"model", "data", "loss", "hardware", "tracking"} <= groups
    assert {o for g, o in group_options() if g == "loss"} == {"sigmoid", "hinge", "ipo", "simpo", "alphapo", "orpo", "dpo"}


def test_defaults_are_trl_cpoconfig_defaults():
    trl_config = pytest.importorskip("trl.experimental.cpo").CPOConfig
    theirs = {f.name: f.default for f in dataclasses.fields(trl_config)}
    ours = Config()
    for key in ("beta", "cpo_alpha", "simpo_gamma", "label_smoothing", "alpha", "max_length"):
        assert getattr(ours, key) == theirs[key], key
    assert ours.loss.name == theirs["loss_type"]
    for key in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
                "weight_decay", "warmup_steps", "seed", "disable_dropout", "logging_steps", "num_train_epochs",
                "lr_scheduler_type", "adam_beta1", "adam_beta2", "adam_epsilon", "max_steps",
                "per_device_eval_batch_size"):
        assert getattr(ours.train, key) == theirs[key], key


def test_simpo_override_switches_loss_and_keeps_cpo_alpha():
    cfg = compose_config(["loss=simpo"])
    assert (cfg.loss.name, cfg.cpo_alpha) == ("simpo", 1.0)  # CPO-SimPO
    cfg = compose_config(["loss=simpo", "cpo_alpha=0"])
    assert cfg.loss_spec().cpo_alpha == 0.0


def test_alphapo_drops_nll_but_respects_an_explicit_cpo_alpha():
    assert compose_config(["loss=alphapo"]).cpo_alpha == 0.0
    assert compose_config(["loss=alphapo", "cpo_alpha=0.5"]).cpo_alpha == 0.5


def test_model_preset_sets_from_scratch_schedule_only_for_tiny():
    assert compose_config([]).train.learning_rate == 1e-3
    assert compose_config(REQUIRED[("model", "hf")] + ["model=hf"]).train.learning_rate == 1e-6


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["beta=0"], "beta must be > 0"),
        (["cpo_alpha=-1"], "cpo_alpha must be >= 0"),
        (["label_smoothing=0.5"], "label_smoothing must be in [0, 0.5)"),
        (["loss=hinge", "label_smoothing=0.1"], "no meaning for loss=hinge"),
        (["loss=ipo", "label_smoothing=0.1"], "no meaning for loss=ipo"),
        (["loss.name=kto"], "loss must be one of sigmoid, hinge, ipo, simpo, alphapo, orpo, dpo"),
        (["max_prompt_length=2000"], "max_prompt_length must be in (0, max_length=1024)"),
        (["truncation_mode=middle"], "truncation_mode must be one of keep_end, keep_start"),
        (["train.learning_rate=0"], "train.learning_rate must be > 0"),
        (["train.lr_scheduler_type=sqrt"], "train.lr_scheduler_type must be one of"),
        (["data.on_bad_rows=ignore"], "data.on_bad_rows must be one of error, skip"),
        (["hardware.mixed_precision=fp8"], "hardware.mixed_precision must be one of"),
        (["eval.generate=true", "data.eval_files=[]"], "eval.generate needs an eval split"),
        (["eval.generate=true", "eval.scorers=[meteor]"], "eval.scorers: unknown scorer 'meteor'"),
    ],
)
def test_impossible_values_are_rejected_naming_the_key(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_wrong_types_and_unknown_keys_fail_at_composition():
    with pytest.raises(Exception, match="beta"):
        compose_config(["beta=abc"])
    with pytest.raises(Exception, match="betta"):
        compose_config(["betta=0.1"])


def test_cfg_job_prints_the_snapshot_of_the_default_config(workdir):
    """A change of defaults shows up in review: regenerate with
    ``python -m cpo_exp --cfg job > tests/snapshots/default_config.yaml``."""
    result = run_cli("--cfg", "job", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SNAPSHOT.read_text()
