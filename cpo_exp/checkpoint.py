"""Checkpoints of a run, and exact resume from them.

A checkpoint is ``<output_dir>/checkpoints/step-<N>/``: ``accelerate``'s saved state (model,
optimizer, scheduler, RNG states of every process) plus ``trainer_state.json``, written by us,
holding what accelerate does not know: the loop position (global step, epoch, micro-batches of
the epoch already consumed, the not-yet-logged metric window), the MLflow run id, the resolved
config with its hash, and a manifest (size and SHA-256 of every file) that detects corruption
before anything is loaded. A checkpoint is written into a temporary folder and renamed when
complete, so a run killed while saving never leaves a half checkpoint under a valid name.

Nothing here imports Hydra: the CLI gives plain dicts, the engine gives the accelerator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
FORMAT = 1
# Keys that may differ between a run and its resumption without changing what is computed.
VOLATILE_KEYS = ("resume", "output_dir", "train.progress_bar", "data.num_proc", "tracking.tracking_uri",
                 "model.token")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file or the key."""


@dataclass
class Position:
    """Where the training loop stands after an optimizer step."""

    global_step: int = 0
    epoch: int = 0
    # Micro-batches of ``epoch`` already consumed: resume skips exactly these.
    batches_in_epoch: int = 0
    # Per-batch values of the metric window not yet logged (logging_steps need not divide save_steps).
    window: dict[str, list[float]] = field(default_factory=dict)
    # Optimizer steps skipped so far for a non-finite loss or gradient (train.on_nonfinite=skip).
    skipped_steps: int = 0


@dataclass
class ResumePoint:
    """A verified checkpoint and what it says about its run."""

    path: Path
    position: Position
    mlflow_run_id: Optional[str]
    config: dict[str, Any]
    num_processes: int = 1


def config_hash(flat_config: dict[str, Any]) -> str:
    """Hash of the flattened resolved config, volatile keys left out."""
    stable = {k: v for k, v in flat_config.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE
    }


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def check_writable(output_dir: str | Path) -> None:
    """Fail before training when the output dir cannot take files (read-only, full, not a dir)."""
    folder = Path(output_dir)
    probe = folder / f".write_probe-{os.getpid()}"  # one per process: ranks probe the same dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"output dir {folder} is not writable: {err.strerror or err}") from None


class Checkpointer:
    """Writes checkpoints of one run every ``save_steps`` and keeps the newest ``total_limit``."""

    def __init__(self, output_dir: str | Path, save_steps: Optional[int], total_limit: Optional[int],
                 flat_config: dict[str, Any], mlflow_run_id: Optional[str] = None,
                 resume: Optional[ResumePoint] = None):
        self.root = Path(output_dir) / CHECKPOINTS
        self.save_steps = save_steps
        self.total_limit = total_limit
        self.flat_config = flat_config
        self.mlflow_run_id = mlflow_run_id
        self.resume = resume
        self.last_saved: Optional[Path] = resume.path if resume else None
        # accelerate reports every file at INFO, and warns about tied embeddings, which it restores.
        for name, level in (("accelerate.checkpointing", logging.WARNING), ("accelerate.accelerator", logging.WARNING),
                            ("accelerate.utils.other", logging.ERROR)):
            logging.getLogger(name).setLevel(level)

    def due(self, step: int) -> bool:
        return bool(self.save_steps) and step % self.save_steps == 0

    def save(self, accelerator, position: Position) -> Path:
        """Save the accelerator's state and our position; every process must call this."""
        final = self.root / f"step-{position.global_step}"
        if self.last_saved == final and final.is_dir():
            return final  # e.g. a signal right after a periodic save
        tmp = self.root / f".tmp-step-{position.global_step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {
                "format": FORMAT,
                "position": asdict(position),
                "mlflow_run_id": self.mlflow_run_id,
                "num_processes": accelerator.num_processes,
                "config_hash": config_hash(self.flat_config),
                "config": self.flat_config,
                "manifest": _manifest(tmp),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
            log.info("checkpoint saved: %s", final)
        accelerator.wait_for_everyone()
        self.last_saved = final
        return final

    def _prune(self) -> None:
        if not self.total_limit:
            return
        for old in checkpoints(self.root.parent)[:-self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, accelerator) -> Position:
        """Load the resume point's state into the prepared objects; returns where to continue."""
        assert self.resume is not None
        if accelerator.num_processes != self.resume.num_processes:
            raise CheckpointError(
                f"checkpoint {self.resume.path} was written by {self.resume.num_processes} process(es), "
                f"this run has {accelerator.num_processes}: the data order would not continue"
            )
        try:
            accelerator.load_state(str(self.resume.path))
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            raise CheckpointError(f"checkpoint {self.resume.path} does not fit this model: {err}") from None
        log.info("resumed from %s at step %d", self.resume.path, self.resume.position.global_step)
        return self.resume.position


def open_resume_point(run_dir: str | Path) -> ResumePoint:
    """The newest checkpoint of ``run_dir``, verified against its manifest. Reads only."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise CheckpointError(f"resume={run_dir}: no such run directory")
    found = checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"resume={run_dir}: no checkpoint under {run_dir / CHECKPOINTS} "
                              "(set train.save_steps to write them)")
    path = found[-1]
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        position = Position(**state["position"])
        manifest, config = state["manifest"], state["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {state_file} is unreadable or corrupt: {err}") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {state_file} has format {state.get('format')!r}, expected {FORMAT}")
    if config_hash(config) != state.get("config_hash"):
        raise CheckpointError(f"checkpoint {state_file}: the stored config does not match its hash (edited?)")
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} differs from the manifest "
                                  f"(size or SHA-256)")
    return ResumePoint(path, position, state.get("mlflow_run_id"), config, int(state.get("num_processes", 1)))


def config_mismatches(stored: dict[str, Any], current: dict[str, Any], keys: list[str]) -> list[str]:
    """``key: checkpoint X, now Y`` for each of ``keys`` (and the keys under it) that differs."""
    problems = []
    for key in keys:
        names = sorted({k for k in {**stored, **current} if k == key or k.startswith(key + ".")}
                       - set(VOLATILE_KEYS))
        for name in names:
            if stored.get(name, "<absent>") != current.get(name, "<absent>"):
                problems.append(f"{name}: checkpoint {stored.get(name, '<absent>')!r}, "
                                f"now {current.get(name, '<absent>')!r}")
    return problems
