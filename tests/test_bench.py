"""The benchmark script runs end to end on a tiny workload and writes its figures (not a speed test).

It lives in ``benchmarks/``, outside the installed package, and is run as a user runs it:
``python benchmarks/bench.py ...`` in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks" / "bench.py"

pytest.importorskip("trl")


def run_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/bench.py ARGS`` in ``cwd``, as a user would run it."""
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})


def load_bench():
    """The script as a module, for its workload table (it is not an importable package module)."""
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_runs_trl_and_our_engine_and_writes_the_figures(workdir):
    out = workdir / "bench.json"
    done = run_bench("--workload", "tiny", "--steps", "2", "--variants", "trl,plain,packed+shared_prompt",
                     "--out", str(out), cwd=workdir)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["conditions"]["workload"] == "tiny"
    assert {"real_tokens", "padded_tokens", "prompt_share"} <= set(report["conditions"]["tokens"])
    variants = [r["variant"] for r in report["results"]]
    assert variants == ["trl", "plain", "packed+shared_prompt"]
    for result in report["results"]:
        assert result["tokens_per_second"] > 0 and result["seconds_per_step"] > 0
        assert result["memory_bytes"] is not None and len(result["step_seconds"]) == 2
        assert "rewards/margins" in result["final_metrics"]
    vs = report["vs_trl"]["packed+shared_prompt"]
    assert {"tokens_per_second_ratio", "peak_memory_ratio", "max_metric_rel_diff", "metric_abs_diff"} <= set(vs)
    # the same model, data and batches: TRL's numbers, logits/* aside (see docs/scale.md, "Performance switches")
    assert report["vs_trl"]["plain"]["max_metric_rel_diff"] < 1e-4
    assert vs["max_metric_rel_diff_excluding_logits"] < 1e-4
    assert "tok/s" in done.stdout


def test_bench_is_not_part_of_the_package():
    assert not (REPO / "cpo_exp" / "bench.py").exists()
    assert importlib.util.find_spec("cpo_exp.bench") is None


def test_gpu_workload_is_the_qwen2_0_5b_shape_in_bf16():
    bench = load_bench()
    w = bench.WORKLOADS["gpu-0.5b"]
    assert (w.vocab_size, w.dtype, w.device, w.pairs) == (151936, "bfloat16", "cuda", 8)
    assert w.max_prompt + w.max_completion + 1 <= 1024
    assert 490e6 < bench.num_parameters(w) < 500e6  # Qwen2-0.5B: 494M with tied embeddings


def test_gpu_workload_without_a_gpu_is_refused_by_name(workdir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = run_bench("--workload", "gpu-0.5b", cwd=workdir)
    assert done.returncode != 0 and "gpu-0.5b needs a CUDA device" in done.stderr
