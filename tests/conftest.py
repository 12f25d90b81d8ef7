"""Shared fixtures: the real CLI in a subprocess, the composed config, TRL for the parity tests,
a temporary MLflow store, tiny real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A quick schedule for end-to-end runs of the embedded default (the full default is tested once).
QUICK = ["train.max_steps=6", "train.logging_steps=3", "train.eval_steps=3", "data.max_eval_samples=16"]


def run_cli(*args: str, cwd: Path, env: dict | None = None, module: str = "cpo_exp",
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m cpo_exp ARGS`` in ``cwd``, as a user would run it."""
    # The developer's own tracking server must never receive test runs.
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def compose():
    """``compose(overrides, hydra=False)``: the config the CLI would run with these overrides, as
    the typed ``Config`` (not yet validated); with ``hydra=True`` the ``DictConfig`` that also
    holds the ``hydra`` node (launcher, sweeper, mode, runtime.choices), interpolations unresolved.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from cpo_exp.cli import config_dir  # also stores the schema (cpo_exp_schema) the config names

    def compose_config(overrides=(), hydra: bool = False):
        GlobalHydra.instance().clear()  # whatever a test before left initialized
        with initialize_config_dir(config_dir=config_dir()):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra)
        return cfg if hydra else OmegaConf.to_object(cfg)

    return compose_config


TRL_MISSING = "TRL is a test dependency (pip install -e .[dev]): the parity tests compare against it"


@pytest.fixture(scope="session")
def trl():
    """TRL with ``trl.experimental.cpo`` and ``trl.data_utils`` imported: the reference of the parity
    tests. A test that asks for it is skipped, saying why, where TRL is not installed; the
    hand-computed tests next to it still run. An installed TRL without ``trl.experimental.cpo``
    (older than the >=1.16 that pyproject.toml asks for) is an error, not a skip."""
    import warnings

    pytest.importorskip("trl", reason=TRL_MISSING)
    with warnings.catch_warnings():
        # TRL keeps CPO in trl.experimental; pyproject.toml pins TRL below 2, so the API holds.
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        import trl.data_utils
        import trl.experimental.cpo

    return trl


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty launch directory: runs write outputs/ and mlflow.db here."""
    return tmp_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_rows() -> list[dict]:
    return [
        {"prompt": "Translate English to German.\nEnglish: the dog sees the cat\nGerman:",
         "chosen": " der Hund sieht die Katze", "rejected": " der Hund sieht den Katze"},
        {"prompt": "Translate English to German.\nEnglish: the red car\nGerman:",
         "chosen": " das rote Auto", "rejected": " das Auto rote"},
        {"prompt": "Translate English to German.\nEnglish: a small house\nGerman:",
         "chosen": " ein kleines Haus", "rejected": " ein Haus"},
        {"prompt": "Translate English to German.\nEnglish: the woman reads\nGerman:",
         "chosen": " die Frau liest", "rejected": " die Frau schreibt"},
    ]


def tiny_moe(tmp_path: Path) -> Path:
    """A 2-layer Qwen2-MoE with 4 experts and router logits on, next to the embedded tokenizer."""
    import shutil

    from transformers import Qwen2MoeConfig

    from cpo_exp.assets import locate

    folder = tmp_path / "tiny_moe"
    Qwen2MoeConfig(vocab_size=929, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, output_router_logits=True,
                   router_aux_loss_coef=0.5, bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(locate("pkg://cpo_exp/assets/tiny_qwen2")) / name, folder / name)
    return folder
