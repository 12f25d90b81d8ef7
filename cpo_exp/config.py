"""Typed configuration: one dataclass per config group, TRL's CPOConfig defaults.

These dataclasses are the single authoritative home of every key, its type and its default
(the loss knobs' defaults are :class:`~cpo_exp.losses.LossSpec`'s, the length limits'
:class:`SequenceLengths`': the specs handed to the losses and the data pipeline are built from
the config, never with literals of their own).
Hydra composes YAML presets from ``conf/`` on top of them (see ``cpo_exp.cli``); the engine,
the losses and the data pipeline receive the resulting objects and never see Hydra.
:func:`validate` checks what types cannot, before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from cpo_exp.losses import LOSS_TYPES, MARGIN_LOSSES, NO_LABEL_SMOOTHING, NO_REWARD_SHAPE, LossSpec
from cpo_exp.metrics import EVAL_PREFIX, LOSS_METRICS, PAIR_METRICS
from cpo_exp.scorers import resolve_scorer


class ConfigError(ValueError):
    """An impossible configuration value; the message names the key."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`: ``{"train.lr": 1}`` -> ``{"train": {"lr": 1}}``."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def parse_override(override: str) -> Optional[tuple[str, str]]:
    """``"+train.lr=1e-3"`` -> ``("train.lr", "1e-3")``: a command-line override's key (without
    Hydra's ``+``/``++``/``~`` prefixes) and its value as written; None when it assigns nothing."""
    if "=" not in override:
        return None
    key, value = override.split("=", 1)
    return key.lstrip("+~"), value


@dataclass(frozen=True)
class SequenceLengths:
    """Length limits, as in TRL's CPOConfig (see docs/data.md, "Tokenization and truncation")."""

    max_length: int = 1024
    max_prompt_length: Optional[int] = 512
    max_completion_length: Optional[int] = None
    truncation_mode: str = "keep_end"


@dataclass
class LossConfig:
    """The loss variant, chosen with ``loss=<name>``; its knobs are top-level keys."""

    name: str = "sigmoid"


@dataclass
class ModelConfig:
    """Any causal LM or encoder-decoder (T5, mT5, NLLB, M2M100 shapes): a local folder or a hub
    id, loaded through one code path.

    ``random_init`` builds the architecture from the folder's ``config.json`` with fresh
    weights instead of loading checkpoint weights (the embedded default has no weights).
    ``pkg://cpo_exp/...`` paths point into the installed package.
    """

    name_or_path: str = "???"
    # The tokenizer's folder or hub id when it is not shipped with the model (null: name_or_path).
    tokenizer: Optional[str] = None
    random_init: bool = False
    dtype: str = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    # Hugging Face hub token for private models; never logged (redacted in MLflow).
    token: Optional[str] = None
    # "lora": train LoRA adapters (peft library) instead of all weights; saving writes the adapter.
    peft: Optional[str] = None
    # LoRA knobs, named and defaulted as TRL's ModelConfig; null target modules: peft's per-architecture default.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Optional[list[str]] = None


@dataclass
class DataConfig:
    """Preference pairs: local files (``train_files``/``eval_files``) or a hub dataset (``path``)."""

    path: Optional[str] = None
    name: Optional[str] = None
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    train_split: str = "train"
    eval_split: Optional[str] = None
    eval_fraction: float = 0.0
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # {name in the data: name we use}, e.g. {question: prompt, good: chosen, bad: rejected}
    columns: dict[str, str] = field(default_factory=dict)
    # A reshaping of rows into pairs (cpo_exp/data/adapters.py), e.g. alma_r, and its arguments.
    adapter: Optional[str] = None
    adapter_args: dict[str, Any] = field(default_factory=dict)
    on_bad_rows: str = "error"
    num_proc: Optional[int] = None


@dataclass
class TrainConfig:
    """Optimisation schedule; names and defaults as in TRL's CPOConfig / TrainingArguments."""

    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    # Evaluate every ``eval_steps`` optimizer steps (and always once before and after training
    # when an eval split exists); null evaluates only before and after.
    eval_steps: Optional[int] = None
    seed: int = 42
    disable_dropout: bool = True
    # Progress bars: null shows them only when stderr is a terminal.
    progress_bar: Optional[bool] = None
    save_model: bool = True
    # Checkpoints (model, optimizer, scheduler, RNG, data position) every save_steps optimizer
    # steps and at the end, under <output_dir>/checkpoints/; null: only at the end and on SIGINT/SIGTERM.
    save_steps: Optional[int] = 500
    # Keep only the newest N checkpoints; null keeps all (TRL's default).
    save_total_limit: Optional[int] = None
    # A non-finite loss or gradient: "stop" fails the run, "skip" drops that optimizer step.
    on_nonfinite: str = "stop"
    # Log the gradient norm of the preference and of the NLL term apart (grad_norm/preference,
    # grad_norm/nll) at logging steps: an extra forward and two backward passes each time.
    component_grad_norms: bool = False


@dataclass
class EvalConfig:
    """What an evaluation measures besides the pair metrics: generated completions, scored
    against ``chosen`` (see ``cpo_exp.generation``). Off by default: generation is slow."""

    generate: bool = False
    num_prompts: int = 32
    batch_size: int = 16
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # Registered names (chrf, bleu, len_ratio, exact_match) or "package.module:function".
    scorers: list[str] = field(default_factory=lambda: ["chrf", "bleu", "len_ratio"])


@dataclass
class HardwareConfig:
    """Device placement and precision, handed to ``accelerate.Accelerator``."""

    mixed_precision: str = "no"
    cpu: bool = False
    # "ddp", "fsdp", "deepspeed": the strategy the launcher must set up (accelerate launch with the
    # matching cpo_exp/launch/*.yaml); checked at start so a forgotten launcher fails before training.
    distributed: str = "no"
    # torch intra-op threads; null chooses: 1 for a model under 50M parameters (as fast idle, and
    # it does not collapse on a busy machine), else torch's default (all cores, or cores // n_jobs
    # inside the workers of the joblib launcher, which sets OMP_NUM_THREADS for them).
    num_threads: Optional[int] = None
    # Processes of one job. > 1 without a launcher around it (e.g. each job of a sweep): the job
    # starts its own `accelerate launch --num_processes N` (with the preset's accelerate config
    # for hardware=ddp|fsdp|deepspeed_*) and waits for it; rank 0 logs the job's one MLflow run.
    num_processes: int = 1
    # In a sweep whose jobs run at once (hydra/launcher=joblib), give each job this many GPUs of
    # its own (CUDA_VISIBLE_DEVICES), e.g. 1 with hydra.launcher.n_jobs=<GPUs>; null: no placement.
    devices_per_job: Optional[int] = None


@dataclass
class EngineConfig:
    """How the pair forward is computed. Every switch gives the plain path's loss, metrics and
    gradients (to float32 rounding); only speed and memory change (see docs/scale.md, "Performance switches").

    ``logits``: ``full`` materialises ``[2B, T, V]`` logits as TRL does; ``chunked`` fuses the
    head with the log-softmax over completion positions, ``logits_chunk_size`` rows at a time.
    ``packing`` lays the batch out without padding (needs ``logits: chunked``);
    ``shared_prompt`` computes each pair's common prefix once (needs ``packing``).
    """

    logits: str = "full"
    logits_chunk_size: int = 512
    packing: bool = False
    shared_prompt: bool = False


@dataclass
class TrackingConfig:
    """Where metrics go. ``backend: none`` runs without MLflow."""

    backend: str = "mlflow"
    # null: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db
    tracking_uri: Optional[str] = None
    experiment_name: str = "cpo_exp"
    # null: named from the command-line overrides (e.g. "loss=simpo,cpo_alpha=0")
    run_name: Optional[str] = None
    # A tracking server that goes away mid-run: training goes on, metrics are buffered, and the
    # end of the run waits this long for the server before giving up (unsent metrics stay on disk).
    reconnect_timeout_s: float = 300.0


@dataclass
class ObjectiveConfig:
    """What a sweep optimises: the final value of one eval metric, returned by each job."""

    metric: str = "eval_rewards/accuracies"
    direction: str = "maximize"
    # An Optuna search (hparams_search=...): how many COMPLETE trials its stored study should hold.
    # A re-run of the same command runs only the trials still missing (see cpo_exp.study).
    n_trials: Optional[int] = None


@dataclass
class ReportConfig:
    """How a sweep's report compares its configurations (see ``cpo_exp.comparison``)."""

    # The configuration the others are compared with, as its swept values ("loss=sigmoid,beta=0.1");
    # null: the sweep's first configuration.
    baseline: Optional[str] = None
    # Of the confidence intervals (Student t over the seeds of a configuration).
    confidence: float = 0.95


@dataclass
class Config:
    """The whole run. Loss knobs and sequence lengths are top-level, as in TRL's CPOConfig."""

    loss: LossConfig = field(default_factory=LossConfig)
    beta: float = LossSpec.beta
    cpo_alpha: float = LossSpec.cpo_alpha
    simpo_gamma: float = LossSpec.simpo_gamma
    # SimPO's margin as a share of beta (its authors tune beta, then gamma/beta in 0.3-0.8): when
    # set, the loss uses simpo_gamma = simpo_gamma_ratio * beta, whatever simpo_gamma says.
    simpo_gamma_ratio: Optional[float] = None
    label_smoothing: float = LossSpec.label_smoothing
    alpha: float = LossSpec.alpha
    max_length: int = SequenceLengths.max_length
    max_prompt_length: Optional[int] = SequenceLengths.max_prompt_length
    max_completion_length: Optional[int] = SequenceLengths.max_completion_length
    truncation_mode: str = SequenceLengths.truncation_mode
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Where the model and logs of this run go; the CLI sets it to Hydra's run directory.
    output_dir: str = "outputs/run"
    # A run directory to continue from its newest checkpoint, with the config stored there.
    resume: Optional[str] = None

    def loss_spec(self) -> LossSpec:
        gamma = self.simpo_gamma if self.simpo_gamma_ratio is None else self.simpo_gamma_ratio * self.beta
        return LossSpec(self.loss.name, self.beta, self.cpo_alpha, gamma, self.label_smoothing, self.alpha)

    def lengths(self) -> SequenceLengths:
        return SequenceLengths(self.max_length, self.max_prompt_length, self.max_completion_length,
                               self.truncation_mode)


_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_PRECISIONS = ("no", "fp16", "bf16")
OBJECTIVE_METRICS = tuple(EVAL_PREFIX + name for name in PAIR_METRICS)


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule} (got {value!r})")


def _one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    _require(value in options, key, "must be one of " + ", ".join(options), value)


def validate(cfg: Config) -> None:
    """Reject impossible values with a message naming the key. Cheap: loads nothing."""
    for part in (_validate_loss, _validate_lengths, _validate_model, _validate_data, _validate_train,
                 _validate_eval, _validate_hardware_and_engine):
        part(cfg)


def _validate_loss(cfg: Config) -> None:
    _one_of("loss", cfg.loss.name, LOSS_TYPES)
    _require(cfg.beta > 0 and math.isfinite(cfg.beta), "beta", "must be > 0", cfg.beta)
    _require(cfg.cpo_alpha >= 0, "cpo_alpha", "must be >= 0", cfg.cpo_alpha)
    _require(0 <= cfg.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)", cfg.label_smoothing)
    if cfg.label_smoothing > 0 and cfg.loss.name in NO_LABEL_SMOOTHING:
        smoothed = "/".join(n for n in LOSS_TYPES if n not in NO_LABEL_SMOOTHING)
        raise ConfigError(
            f"label_smoothing={cfg.label_smoothing} has no meaning for loss={cfg.loss.name}: "
            "the hinge, IPO and ORPO losses have no label-smoothed form (TRL ignores it, or has no such key). "
            f"Set label_smoothing=0 or use loss={smoothed}."
        )
    _require(math.isfinite(cfg.simpo_gamma), "simpo_gamma", "must be finite", cfg.simpo_gamma)
    if cfg.simpo_gamma_ratio is not None:
        _require(math.isfinite(cfg.simpo_gamma_ratio) and cfg.simpo_gamma_ratio >= 0, "simpo_gamma_ratio",
                 "must be >= 0 and finite, or null", cfg.simpo_gamma_ratio)
        if cfg.loss.name not in MARGIN_LOSSES:
            raise ConfigError(
                f"simpo_gamma_ratio={cfg.simpo_gamma_ratio} has no meaning for loss={cfg.loss.name}: it sets SimPO's "
                f"target margin (simpo_gamma = simpo_gamma_ratio * beta), which only loss="
                f"{' and loss='.join(sorted(MARGIN_LOSSES))} have. Set simpo_gamma_ratio=null or use loss=simpo."
            )
    _require(math.isfinite(cfg.alpha), "alpha", "must be finite", cfg.alpha)
    if cfg.alpha != 0 and cfg.loss.name in NO_REWARD_SHAPE:
        raise ConfigError(
            f"alpha={cfg.alpha} has no meaning for loss={cfg.loss.name}: AlphaPO's reward shape applies to the "
            "reference-free CPO losses, not to ORPO's odds or DPO's reference log-ratios. Set alpha=0."
        )


def _validate_lengths(cfg: Config) -> None:
    _require(cfg.max_length > 1, "max_length", "must be > 1", cfg.max_length)
    if cfg.max_prompt_length is not None:
        _require(
            0 < cfg.max_prompt_length < cfg.max_length,
            "max_prompt_length",
            f"must be in (0, max_length={cfg.max_length}) so that completions have room",
            cfg.max_prompt_length,
        )
    if cfg.max_completion_length is not None:
        _require(cfg.max_completion_length > 0, "max_completion_length", "must be > 0", cfg.max_completion_length)
    _one_of("truncation_mode", cfg.truncation_mode, ("keep_end", "keep_start"))


def _validate_model(cfg: Config) -> None:
    _require(bool(cfg.model.name_or_path) and cfg.model.name_or_path != "???",
             "model.name_or_path", "must name a folder or a hub id", cfg.model.name_or_path)
    _one_of("model.dtype", cfg.model.dtype, _DTYPES)
    if cfg.model.peft is not None:
        _one_of("model.peft", cfg.model.peft, ("lora",))
        _require(cfg.model.lora_r > 0, "model.lora_r", "must be > 0", cfg.model.lora_r)
        _require(0 <= cfg.model.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)", cfg.model.lora_dropout)


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _require(bool(d.train_files) or bool(d.path), "data.path",
             "or data.train_files must name the training data", d.path)
    _require(0 <= d.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)", d.eval_fraction)
    has_eval = bool(d.eval_files) or (bool(d.eval_split) and not d.train_files)
    _require(d.eval_fraction == 0 or not has_eval, "data.eval_fraction",
             "must be 0 when an eval split is given (data.eval_files / data.eval_split)", d.eval_fraction)
    if d.num_proc is not None:
        _require(d.num_proc > 0, "data.num_proc", "must be > 0 or null", d.num_proc)
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, key)
        if value is not None:
            _require(value > 0, f"data.{key}", "must be > 0", value)
    _one_of("data.on_bad_rows", d.on_bad_rows, ("error", "skip"))


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    _require(t.learning_rate > 0, "train.learning_rate", "must be > 0", t.learning_rate)
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps"):
        _require(getattr(t, key) > 0, f"train.{key}", "must be > 0", getattr(t, key))
    _require(t.max_steps > 0 or t.num_train_epochs > 0, "train.max_steps",
             "or train.num_train_epochs must be > 0", t.max_steps)
    _require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", t.warmup_ratio)
    _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", t.warmup_steps)
    _one_of("train.lr_scheduler_type", t.lr_scheduler_type, _SCHEDULERS)
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)", t.max_grad_norm)
    if t.eval_steps is not None:
        _require(t.eval_steps > 0, "train.eval_steps", "must be > 0 or null", t.eval_steps)
    for key in ("save_steps", "save_total_limit"):
        if getattr(t, key) is not None:
            _require(getattr(t, key) > 0, f"train.{key}", "must be > 0 or null", getattr(t, key))
    _one_of("train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))


def _validate_eval(cfg: Config) -> None:
    e, d = cfg.eval, cfg.data
    for key in ("num_prompts", "batch_size", "max_new_tokens"):
        _require(getattr(e, key) > 0, f"eval.{key}", "must be > 0", getattr(e, key))
    _require(e.temperature > 0, "eval.temperature", "must be > 0", e.temperature)
    _require(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1]", e.top_p)
    if e.generate:
        _require(bool(d.eval_files or d.eval_split or d.eval_fraction), "eval.generate",
                 "needs an eval split (data.eval_files, data.eval_split or data.eval_fraction)", e.generate)
        for name in e.scorers:
            try:
                resolve_scorer(name)
            except ValueError as err:
                raise ConfigError(f"eval.scorers: {err}") from None
    # Generation scores can be the objective too, when they are computed.
    generated = tuple(f"eval_gen/{name}" for name in e.scorers) if e.generate else ()
    own = tuple(EVAL_PREFIX + name for name in LOSS_METRICS.get(cfg.loss.name, ()))  # e.g. ORPO's log odds
    _one_of("objective.metric", cfg.objective.metric, OBJECTIVE_METRICS + own + generated)
    _one_of("objective.direction", cfg.objective.direction, ("maximize", "minimize"))
    if cfg.objective.n_trials is not None:
        _require(cfg.objective.n_trials >= 1, "objective.n_trials", "must be >= 1, or null", cfg.objective.n_trials)
    _require(0 < cfg.report.confidence < 1, "report.confidence", "must be in (0, 1)", cfg.report.confidence)


def _validate_hardware_and_engine(cfg: Config) -> None:
    _one_of("hardware.mixed_precision", cfg.hardware.mixed_precision, _PRECISIONS)
    _one_of("hardware.distributed", cfg.hardware.distributed, ("no", "ddp", "fsdp", "deepspeed"))
    _require(cfg.hardware.num_processes > 0, "hardware.num_processes", "must be > 0", cfg.hardware.num_processes)
    if cfg.hardware.devices_per_job is not None:
        _require(cfg.hardware.devices_per_job > 0, "hardware.devices_per_job", "must be > 0 or null",
                 cfg.hardware.devices_per_job)
    if cfg.hardware.num_threads is not None:
        _require(cfg.hardware.num_threads > 0, "hardware.num_threads", "must be > 0 or null",
                 cfg.hardware.num_threads)
    g = cfg.engine
    _one_of("engine.logits", g.logits, ("full", "chunked"))
    _require(g.logits_chunk_size > 0, "engine.logits_chunk_size", "must be > 0", g.logits_chunk_size)
    _require(not g.packing or g.logits == "chunked", "engine.packing",
             "needs engine.logits=chunked (a packed batch is read from hidden states)", g.packing)
    _require(not g.shared_prompt or g.packing, "engine.shared_prompt", "needs engine.packing=true",
             g.shared_prompt)
    _one_of("tracking.backend", cfg.tracking.backend, ("mlflow", "none"))


# --------------------------------------------------------------------------- command-line keys


def _schema_node(cls: type, key: str) -> tuple[Optional[str], list[str]]:
    """``(None, [])`` when dotted ``key`` names a key of the dataclass ``cls`` (or lies inside one
    of its free-form dicts); otherwise ``(the unknown part, the valid names at that level)``."""
    import typing

    node: Any = cls
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(node)
        if part not in hints:
            prefix = ".".join(parts[:depth])
            return ".".join(parts[:depth + 1]), [f"{prefix}.{name}" if prefix else name for name in hints]
        kind = hints[part]
        if typing.get_origin(kind) is typing.Union:  # Optional[...]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is dict or kind is Any:
            return None, []  # free-form: data.columns, data.adapter_args
        if not dataclasses.is_dataclass(kind):
            return (None, []) if depth == len(parts) - 1 else (key, [".".join(parts[:depth + 1])])
        node = kind
    return None, []


def _closest(wrong: str, valid: list[str]) -> Optional[str]:
    """The valid key a typo most likely meant: a close spelling (``los`` -> ``loss``), else the
    shortest key whose last part has the typo's letters in order (``train.lr`` -> ``train.learning_rate``)."""
    import difflib

    leaf = wrong.rsplit(".", 1)[-1]
    leaves = {v.rsplit(".", 1)[-1]: v for v in valid}  # compare the last parts: the prefix is shared
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    if close:
        return leaves[close[0]]

    def has_in_order(name: str) -> bool:
        letters = iter(name)
        return name[:1] == leaf[:1] and all(c in letters for c in leaf)

    candidates = [v for v in valid if has_in_order(v.rsplit(".", 1)[-1])]
    return min(candidates, key=len) if candidates else None


def unknown_key(override: str, groups: tuple[str, ...]) -> Optional[str]:
    """Why a command-line override names no key of the config (or None when it does).

    Hydra itself accepts ``+anything=...`` and would train with the typo ignored; this names the
    key and suggests the closest valid one. ``groups`` are the config groups (``loss``, ``model``, ...)."""
    parsed = parse_override(override)
    if parsed is None:
        return None
    key = parsed[0]
    if key.split(".")[0].split("/")[0] == "hydra" or key in groups or key.split("/")[0] in groups:
        return None
    wrong, valid = _schema_node(Config, key)
    if wrong is None:
        return None
    if key == wrong:
        valid = valid + list(groups)
    suggestion = _closest(wrong, valid)
    hint = f"did you mean {suggestion!r}? " if suggestion else ""
    return (f"unknown config key {wrong!r} in {override!r}: {hint}(python -m cpo_exp --help lists the groups and "
            "keys; --cfg job prints the whole config)")
