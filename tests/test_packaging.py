"""The installed wheel carries its config and assets and runs from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("cpo_exp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "cpo_exp/conf/config.yaml" in names and "cpo_exp/conf/loss/simpo.yaml" in names
    assert "cpo_exp/assets/tiny_qwen2/tokenizer.json" in names
    # the benchmark is a script of the repository, not part of what is installed
    assert not any(name.startswith("benchmarks/") or name.endswith("/bench.py") for name in names)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "cpo_exp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_wheel_finds_its_config_from_any_directory(installed_wheel, tmp_path):
    where = subprocess.run([sys.executable, "-c", "import cpo_exp; print(cpo_exp.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(installed_wheel)}, capture_output=True, text=True)
    assert where.stdout.startswith(str(installed_wheel))
    shown = run_installed(installed_wheel, tmp_path, "loss=simpo", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert "name: simpo" in shown.stdout


@pytest.mark.slow
def test_wheel_trains_the_embedded_default(installed_wheel, tmp_path):
    result = run_installed(installed_wheel, tmp_path, "train.max_steps=2", "train.logging_steps=1",
                           "data.max_eval_samples=8", "tracking=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("outputs/*/*/model/config.json"))
