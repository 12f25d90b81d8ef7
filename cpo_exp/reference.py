"""The reference model's log-probs of every pair, for the losses measured against one (DPO).

The reference is the initial policy. Its per-sequence (summed) log-probs of every train and eval
pair are computed once, before training, through the same pair forward as training
(:func:`cpo_exp.forward.pair_forward`, any engine variant), in eval mode and without gradients,
as TRL's ``precompute_ref_log_probs`` does; they become two columns of the tokenized splits
(``ref_chosen_logps``, ``ref_rejected_logps``), which the collators put into every batch. So
training holds one model.

They are cached in the ``datasets`` cache (``$HF_DATASETS_CACHE/cpo_exp_reference/``) under a key
made of the reference weights' hash, the tokenized data's fingerprint (which covers the data,
the tokenizer and the length limits) and the forward that computes them (engine variant, mixed
precision, device type): a second run, or a resumed one, reads them back. Each split is computed
in its own loader's batch size and order (eval: as the evaluations batch it) by the forward that
training uses, so at step 0 the eval rewards are exactly 0 (another variant's log-probs differ
by float rounding, enough for a strict ``>`` to count some pairs as won).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from cpo_exp.config import EngineConfig, TrainConfig
from cpo_exp.data import REFERENCE_COLUMNS, PairRows
from cpo_exp.forward import pair_forward

log = logging.getLogger(__name__)


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes, values): the reference's identity."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def cache_file(identity: str, dataset: datasets.Dataset, batch_size: int) -> Path:
    """Where the reference log-probs of ``dataset`` by the reference ``identity`` (weights and forward) are kept."""
    key = hashlib.sha256(f"{identity}\x00{dataset._fingerprint}\x00{batch_size}".encode()).hexdigest()[:24]
    return Path(datasets.config.HF_DATASETS_CACHE) / "cpo_exp_reference" / f"ref-{key}.npz"


@torch.no_grad()
def reference_logps(model, dataset: datasets.Dataset, collate, batch_size: int, engine: EngineConfig,
                    device: torch.device, autocast) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of chosen and rejected of every row of ``dataset``, in its order."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in DataLoader(PairRows(dataset), batch_size=batch_size, collate_fn=collate):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast():
            out = pair_forward(model, batch, False, engine)
        chosen.append(out.chosen_logps.float().cpu())
        rejected.append(out.rejected_logps.float().cpu())
    model.train(was_training)
    return torch.cat(chosen).numpy(), torch.cat(rejected).numpy()


def with_reference(model, train_set: datasets.Dataset, eval_set: Optional[datasets.Dataset], cfg: TrainConfig,
                   collate, engine: EngineConfig, accelerator) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """Both splits with the reference columns added, computed by ``model`` (the initial policy) or
    read from the cache. With LoRA the reference is the base model: the adapters are disabled for it."""
    # What decides the rounding of the log-probs belongs to the key too: the forward variant, the
    # precision and the device (a lean run must not read a plain run's reference).
    identity = f"{weights_hash(model)}\x00{engine!r}\x00{accelerator.mixed_precision}\x00{accelerator.device.type}"
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with disabled:
        return (_with_reference(model, identity, "train", train_set, cfg.per_device_train_batch_size, collate,
                                engine, accelerator),
                _with_reference(model, identity, "eval", eval_set, cfg.per_device_eval_batch_size, collate, engine,
                                accelerator) if eval_set is not None else None)


def _with_reference(model, identity: str, split: str, dataset: datasets.Dataset, batch_size: int, collate,
                    engine: EngineConfig, accelerator) -> datasets.Dataset:
    path = cache_file(identity, dataset, batch_size)
    if path.is_file():
        stored = np.load(path)
        chosen, rejected = stored["chosen"], stored["rejected"]
        log.info("%s: reference log-probs read from cache %s", split, path)
    else:
        chosen, rejected = reference_logps(model, dataset, collate, batch_size, engine, accelerator.device,
                                           accelerator.autocast)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.npz")  # a rank writing at the same time never tears it
        np.savez(partial, chosen=chosen, rejected=rejected)
        partial.replace(path)
        log.info("%s: reference log-probs of %d pairs computed and cached in %s", split, len(chosen), path)
    return dataset.add_column(REFERENCE_COLUMNS[0], chosen.tolist()).add_column(REFERENCE_COLUMNS[1], rejected.tolist())
