"""Scale through existing engines: hardware presets, accelerate launcher configs, 2 processes on CPU
(gloo: DDP through the CLI, FSDP2 with accelerate's composition), the SLURM launcher preset, LoRA
through peft, and the router loss of mixture-of-experts models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cpo_exp.cli import check_launcher, check_shared_run_dir
from cpo_exp.config import Config, ConfigError, validate
from cpo_exp.launch import PRESETS, config_file

from conftest import run_cli, tiny_moe


@pytest.mark.parametrize("preset,strategy", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                             ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")])
def test_distributed_presets_pair_with_an_accelerate_config_that_accelerate_reads(compose, preset, strategy):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg: Config = compose([f"hardware={preset}"])
    validate(cfg)
    assert cfg.hardware.mixed_precision == "bf16" and not cfg.hardware.cpu
    launcher = load_config_from_file(str(config_file(preset)))
    assert launcher.distributed_type.value == strategy and launcher.mixed_precision == "bf16"
    if preset.startswith("deepspeed"):
        assert launcher.deepspeed_config["zero_stage"] == int(preset[-1])
    assert set(PRESETS) == {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}


def test_the_launch_command_in_the_error_message_prints_the_config_path():
    """The command that the launcher error (below) and the README tell users to type."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cpo_exp.launch", "fsdp"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == config_file("fsdp") and config_file("fsdp").is_file()
    wrong = subprocess.run([sys.executable, "-m", "cpo_exp.launch", "fsdp3"], capture_output=True, text=True)
    assert wrong.returncode == 1 and "no accelerate config for hardware=fsdp3" in wrong.stderr


def test_fsdp_and_deepspeed_without_their_launcher_fail_before_training():
    with pytest.raises(ConfigError, match=r"accelerate launch --config_file \$\(python -m cpo_exp.launch fsdp\)"):
        check_launcher("fsdp", {})
    with pytest.raises(ConfigError, match=r"hardware.distributed=deepspeed needs accelerate's launcher: .*"
                                          r"--config_file \$\(python -m cpo_exp.launch deepspeed_zero2\)"):
        check_launcher("deepspeed", {"ACCELERATE_USE_FSDP": "true"})
    check_launcher("fsdp", {"ACCELERATE_USE_FSDP": "true"})
    check_launcher("ddp", {})


def test_several_processes_need_one_explicit_run_dir():
    with pytest.raises(ConfigError, match="add hydra.run.dir=outputs/<name>"):
        check_shared_run_dir(2, ["hydra.job.chdir=false"], None)
    check_shared_run_dir(2, ["hydra.run.dir=outputs/x"], None)
    check_shared_run_dir(2, [], "outputs/x")  # resume pins the dir
    check_shared_run_dir(1, [], None)


def test_slurm_launcher_preset_sets_its_resources_over_submitits_defaults(compose):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the SLURM launcher is an extra (pip install -e .[slurm], or .[dev])")
    # partition: the example override in the preset's header, a key the launcher must know.
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # submitit's defaults are 60 minutes and no CPUs or GPUs asked for.
    assert (launcher.timeout_min, launcher.cpus_per_task, launcher.gpus_per_node) == (1440, 8, 1)
    # One task per job (Hydra stays the outer process); 120 s between SIGTERM and the kill to checkpoint.
    assert (launcher.nodes, launcher.tasks_per_node, launcher.signal_delay_s) == (1, 1, 120)


# --------------------------------------------------------------------------- 2 processes, gloo

# cpo_alpha=0: the NLL term is a token-weighted mean, which each process takes over its own half
# of the batch, so only the pair-averaged terms are identical between 1 and 2 processes. A small
# learning rate keeps Adam's sign-like first steps from amplifying float rounding differences.
# save_steps=3 with logging_steps=2: the step-3 checkpoint holds a half-filled metric window.
EQUAL_BATCH = ["cpo_alpha=0", "train.learning_rate=1e-5", "train.max_steps=6", "train.logging_steps=2",
               "train.eval_steps=2", "train.save_steps=3", "data.max_eval_samples=16", "train.save_model=false"]


def accelerate_launch_2(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", "0", "-m", "cpo_exp", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["plain", "lean"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(workdir, engine):
    """Also across a resume: the 2-process run loses its last checkpoint and continues from step 3.

    ``grad_norm`` (rank 0's) equals the one process's only if DDP all-reduced the gradients, which
    with ``engine=lean`` needs the packed hidden-state forward to run through DDP's forward."""
    import shutil

    two = accelerate_launch_2("hardware=ddp", "hardware.cpu=true", "hardware.mixed_precision=no",
                              "train.per_device_train_batch_size=4", "train.per_device_eval_batch_size=4",
                              *EQUAL_BATCH, f"engine={engine}", "hydra.run.dir=outputs/two", cwd=workdir)
    assert two.returncode == 0, two.stderr[-3000:]
    shutil.rmtree(workdir / "outputs" / "two" / "checkpoints" / "step-6")
    resumed = accelerate_launch_2(f"resume={workdir / 'outputs' / 'two'}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-3 at step 3" in resumed.stderr
    one = run_cli(*EQUAL_BATCH, f"engine={engine}", "hydra.run.dir=outputs/one", cwd=workdir)
    assert one.returncode == 0, one.stderr[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = {Path(r.data.tags["output_dir"]).name: r
            for r in client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])}
    assert sorted(runs) == ["one", "two"]  # rank 1 never opened a run
    for name in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                 "eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        got = {m.step: m.value for m in sorted(client.get_metric_history(runs["two"].info.run_id, name),
                                               key=lambda m: m.timestamp)}  # the resumed values last
        expected = {m.step: m.value for m in client.get_metric_history(runs["one"].info.run_id, name)}
        assert sorted(got) == sorted(expected) and got == pytest.approx(expected, rel=2e-3, abs=2e-3), name
    run_dir = workdir / "outputs" / "two"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-6").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert not list(workdir.glob("outputs/2*"))  # no per-process timestamped dirs


@pytest.mark.slow
def test_lean_engine_under_fsdp2_gives_the_full_batch_gradients(tmp_path, toy_rows):
    """The fused head reads lm_head's weight while FSDP2 has it gathered, and the hidden-state
    forward runs inside the root's forward: 2 ranks on half the pairs each give one process's
    gradients on all of them (see fsdp2_worker.py)."""
    import json

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(toy_rows))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(Path(__file__).parent / "fsdp2_worker.py"), str(rows)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank-*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert "FSDPQwen2DecoderLayer" in r["units"]  # auto-wrap found the decoder layers
        assert r["grad_rel_diff"] < 1e-5 and r["generated"] == 6


# --------------------------------------------------------------------------- PEFT and MoE


def test_lora_trains_adapters_only_and_saves_the_adapter(workdir):
    pytest.importorskip("peft", reason="LoRA needs the peft extra (pip install -e .[peft], or .[dev])")
    result = run_cli("model.peft=lora", "model.lora_r=4", "train.max_steps=2", "train.logging_steps=1",
                     "data.max_eval_samples=8", "hydra.run.dir=outputs/lora", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = workdir / "outputs" / "lora" / "model"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    assert not (saved / "model.safetensors").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])[0]
    trainable, total = int(run.data.params["model.trainable_parameters"]), int(run.data.params["model.num_parameters"])
    assert 0 < trainable < total / 10


def test_moe_router_loss_is_added_with_its_coefficient_and_logged(tmp_path, toy_rows):
    import datasets
    import torch

    from cpo_exp.config import ModelConfig
    from cpo_exp.data import PreferenceCollator, SequenceLengths, tokenize_dataset
    from cpo_exp.engine import pair_loss
    from cpo_exp.forward import router_aux_loss_coef
    from cpo_exp.losses import LossSpec
    from cpo_exp.models import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_moe(tmp_path)), random_init=True)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer)
    assert router_aux_loss_coef(model) == 0.5
    rows = tokenize_dataset(datasets.Dataset.from_list(toy_rows), tokenizer, SequenceLengths(128, 64, None, "keep_end"),
                            "train", "error", None)
    batch = PreferenceCollator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    spec = LossSpec("sigmoid", beta=0.1, cpo_alpha=1.0)
    with_aux, metrics = pair_loss(model, batch, spec, 0.5)
    without, plain = pair_loss(model, batch, spec, 0.0)
    assert metrics["aux_loss"] > 0 and "aux_loss" not in plain
    assert with_aux.item() == pytest.approx(without.item() + 0.5 * metrics["aux_loss"].item(), rel=1e-6)
    with_aux.backward()  # the router is trained through the aux term
    router_grads = [p.grad for n, p in model.named_parameters() if "gate.weight" in n and "shared" not in n]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)


@pytest.mark.slow
def test_a_sweep_of_two_process_jobs_is_one_command_with_one_child_run_per_job(workdir):
    """Each job starts its own ``accelerate launch`` of 2 gloo processes; rank 0 logs the job's run."""
    result = run_cli("-m", "loss=sigmoid,simpo", "hardware=ddp", "hardware.num_processes=2", "hardware.cpu=true",
                     "hardware.mixed_precision=no", "train.max_steps=4", "train.logging_steps=2",
                     "train.eval_steps=2", "data.max_eval_samples=8", "train.save_model=false", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("this job runs on 2 processes") == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(runs) == 3  # one run per job, not one per process
    assert sorted(r.data.tags["job_num"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and "eval_loss" in r.data.metrics for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for child in children:  # both ranks took part: accelerate saved the RNG state of each
        final = Path(child.data.tags["output_dir"]) / "checkpoints" / "step-4"
        assert sorted(p.name for p in final.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    report = next(workdir.glob("outputs/multirun/*/*/report.md")).read_text()
    assert "2 jobs: finished 2" in report


def _hold_gpus(sweep_dir: str, count: int, visible: list[str], queue, release) -> None:
    from cpo_exp.job import claimed_devices

    with claimed_devices(sweep_dir, count, visible, poll_s=0.05) as devices:
        queue.put((devices, os.environ["CUDA_VISIBLE_DEVICES"]))
        release.wait(30)


def test_parallel_sweep_jobs_each_get_gpus_of_their_own_and_wait_when_all_are_taken(tmp_path):
    """The placement of hardware.devices_per_job, without a GPU: real processes, real file locks."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue, release = ctx.Queue(), ctx.Event()
    visible = ["0", "1", "2", "3"]
    jobs = [ctx.Process(target=_hold_gpus, args=(str(tmp_path), 2, visible, queue, release)) for _ in range(2)]
    for job in jobs:
        job.start()
    first, second = queue.get(timeout=60), queue.get(timeout=60)
    assert sorted(first[0] + second[0]) == visible  # disjoint pairs, all four GPUs in use
    assert {first[1], second[1]} == {",".join(first[0]), ",".join(second[0])}  # CUDA_VISIBLE_DEVICES set
    third = ctx.Process(target=_hold_gpus, args=(str(tmp_path), 1, visible, queue, release))
    third.start()
    import queue as queues

    with pytest.raises(queues.Empty):  # every GPU is held: the third job waits
        queue.get(timeout=1.5)
    release.set()
    assert len(queue.get(timeout=60)[0]) == 1  # and runs once a job has ended
    for job in (*jobs, third):
        job.join(30)
        assert job.exitcode == 0


def test_asking_for_more_gpus_than_are_visible_is_named():
    from cpo_exp.job import claimed_devices

    with pytest.raises(ConfigError, match=r"hardware.devices_per_job=2, but only 1 GPU\(s\) are visible \(0\)"):
        with claimed_devices("/tmp", 2, ["0"]):
            pass


@pytest.mark.slow
def test_parallel_sweep_jobs_with_gpus_of_their_own_train_in_fresh_processes_that_see_only_them(workdir):
    """``hardware.devices_per_job=1`` beside two "visible GPUs" (CUDA_VISIBLE_DEVICES=0,1; the jobs
    train on the CPU): each job holds one, and trains in a process of its own started with it."""
    result = run_cli("-m", "loss=sigmoid,simpo", "hardware.devices_per_job=1", "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", "train.max_steps=4", "train.logging_steps=2", "train.eval_steps=2",
                     "data.max_eval_samples=8", "train.save_model=false", cwd=workdir,
                     env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.returncode == 0, result.stderr[-3000:]
    logs = sorted(workdir.glob("outputs/multirun/*/*/*/cpo_exp.log"))
    held = sorted(line.split("GPU(s) ")[1].split(" of ")[0] for log in logs for line in log.read_text().splitlines()
                  if "this job runs on GPU(s)" in line)
    # each job held one GPU (the same one twice only if the two jobs did not overlap) and trained in a
    # process started after it held it
    assert len(held) == 2 and set(held) <= {"0", "1"}
    assert result.stderr.count("this job runs on 1 process: python -m cpo_exp") == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    children = [r for r in client.search_runs([client.get_experiment_by_name("cpo_exp").experiment_id])
                if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(r.data.tags["job_num"] for r in children) == ["0", "1"]  # one run per job
    assert all(r.info.status == "FINISHED" for r in children)
