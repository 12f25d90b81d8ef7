"""Config composition: every preset of every group composes, impossible values are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from cpo_exp.cli import config_dir
from cpo_exp.config import Config, ConfigError, flatten, validate
from cpo_exp.losses import LossSpec

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


@pytest.mark.parametrize("group,option", group_options(), ids=lambda v: str(v))
def test_every_preset_composes_validates_and_its_values_win(compose, group, option):
    """Every value a preset file sets is in the composed config: no later default (the schema, a
    group after it) shadows it. Hydra's own ``defaults`` lists are checked by what they select."""
    required = REQUIRED.get((group, option), [])
    validate(compose([f"{group}={option}", *required]))
    composed = flatten(OmegaConf.to_container(compose([f"{group}={option}", *required], hydra=True),
                                              resolve=False, enum_to_str=True))
    path = Path(config_dir()) / group / f"{option}.yaml"
    preset = OmegaConf.to_container(OmegaConf.load(path))
    preset.pop("defaults", None)
    package = "" if path.read_text().startswith("# @package _global_") else f"{group}."
    values = flatten(preset, package)
    # The keys a preset leaves to the user (???) are the ones REQUIRED gives.
    assert {k for k, v in values.items() if v == "???"} == {o.split("=")[0] for o in required}
    expected = {k: v for k, v in values.items() if v != "???"}
    assert {k: composed.get(k) for k in expected} == expected


def test_the_config_groups_and_the_five_loss_presets_exist():
    groups = {g for g, _ in group_options()}
    assert {"model", "data", "loss", "hardware", "tracking"} <= groups
    assert {o for g, o in group_options() if g == "loss"} == {"sigmoid", "hinge", "ipo", "simpo", "alphapo", "orpo", "dpo"}


def test_defaults_are_trl_cpoconfig_defaults(trl):
    theirs = {f.name: f.default for f in dataclasses.fields(trl.experimental.cpo.CPOConfig)}
    ours = Config()
    for key in ("beta", "cpo_alpha", "simpo_gamma", "label_smoothing", "alpha", "max_length"):
        assert getattr(ours, key) == theirs[key], key
    assert ours.loss.name == theirs["loss_type"]
    for key in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
                "weight_decay", "warmup_steps", "seed", "disable_dropout", "logging_steps", "num_train_epochs",
                "lr_scheduler_type", "adam_beta1", "adam_beta2", "adam_epsilon", "max_steps",
                "per_device_eval_batch_size"):
        assert getattr(ours.train, key) == theirs[key], key


def test_simpo_preset_keeps_the_nll_term_until_cpo_alpha_is_zero(compose):
    cfg = compose(["loss=simpo"])
    assert (cfg.loss.name, cfg.cpo_alpha) == ("simpo", 1.0)  # CPO-SimPO
    # Every field reaches the loss; the preset's beta and gamma are the SimPO authors' (gamma/beta 0.5),
    # not TRL's beta=0.1 (gamma/beta 5).
    assert compose(["loss=simpo", "cpo_alpha=0"]).loss_spec() == LossSpec(
        "simpo", beta=2.0, cpo_alpha=0.0, simpo_gamma=1.0, label_smoothing=0.0, alpha=0.0)


def test_alphapo_drops_nll_but_respects_an_explicit_cpo_alpha(compose):
    assert compose(["loss=alphapo"]).cpo_alpha == 0.0
    assert compose(["loss=alphapo", "cpo_alpha=0.5"]).cpo_alpha == 0.5


def test_model_preset_sets_from_scratch_schedule_only_for_tiny(compose):
    assert compose([]).train.learning_rate == 1e-3
    assert compose(REQUIRED[("model", "hf")] + ["model=hf"]).train.learning_rate == 1e-6


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
def test_impossible_values_are_rejected_naming_the_key(compose, overrides, message):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_wrong_types_and_unknown_keys_fail_at_composition_naming_the_key(compose):
    with pytest.raises(ConfigCompositionException, match="Error merging override beta=abc") as err:
        compose(["beta=abc"])
    assert isinstance(err.value.__cause__, ValidationError)  # the schema's type, not our validate()
    assert "Value 'abc' of type 'str' could not be converted to Float" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="Could not override 'betta'") as err:
        compose(["betta=0.1"])
    assert isinstance(err.value.__cause__, ConfigAttributeError)
    assert "Key 'betta' not in 'Config'" in str(err.value.__cause__)


def test_cfg_job_prints_the_snapshot_of_the_default_config(workdir):
    """A change of defaults shows up in review: regenerate with
    ``python -m cpo_exp --cfg job > tests/snapshots/default_config.yaml``."""
    result = run_cli("--cfg", "job", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SNAPSHOT.read_text()


def test_simpo_gamma_ratio_sets_the_margin_as_a_share_of_beta(compose):
    spec = compose(["loss=simpo", "beta=10", "simpo_gamma_ratio=0.3"]).loss_spec()
    assert (spec.beta, spec.simpo_gamma) == (10.0, 3.0)
    assert compose(["loss=simpo", "beta=10"]).loss_spec().simpo_gamma == 1.0  # the preset's own gamma
    cfg = compose(["loss=simpo", "simpo_gamma_ratio=-1"])
    with pytest.raises(ConfigError, match=r"simpo_gamma_ratio must be >= 0 and finite, or null \(got -1.0\)"):
        validate(cfg)


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", "orpo", "dpo"])
def test_simpo_gamma_ratio_is_refused_for_a_loss_without_a_margin(compose, loss):
    cfg = compose([f"loss={loss}", "simpo_gamma_ratio=0.5"])
    with pytest.raises(ConfigError, match=rf"simpo_gamma_ratio=0.5 has no meaning for loss={loss}: .*"
                                          r"only loss=alphapo and loss=simpo have"):
        validate(cfg)
    validate(compose(["loss=alphapo", "simpo_gamma_ratio=0.5"]))
