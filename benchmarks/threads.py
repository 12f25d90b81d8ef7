"""How the thread count holds up on a busy machine: ``python benchmarks/threads.py``.

Runs a default-shaped job of the real CLI (``python -m cpo_exp``, evaluation only at the ends)
for each thread setting, idle and beside ``N`` busy processes (each a Python loop that never
sleeps, as another job on the machine would be), the settings alternated within each load
level. Prints, per load and setting, the median wall time of the whole process and of the
training steps, and the ratio to the same setting idle. ``auto`` is the default
(``hardware.num_threads`` unset); a number sets ``hardware.num_threads``.

    python benchmarks/threads.py                         # tiny model, 150 steps, loads 0/1/2, auto,1,2
    python benchmarks/threads.py --model cpu-small --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUMMARY = re.compile(r"wall ([\d.]+)s: forward/backward/optimizer steps ([\d.]+)s")
THREADS_LINE = re.compile(r"torch threads: (\d+)")


def cpu_small_folder(root: Path) -> Path:
    """The ``cpu-small`` shape of benchmarks/bench.py (21.7M parameters) beside the embedded tokenizer."""
    import shutil

    from transformers import Qwen2Config

    from cpo_exp.assets import locate

    folder = root / "cpu_small"
    Qwen2Config(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0,
                eos_token_id=1, pad_token_id=2).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(locate("pkg://cpo_exp/assets/tiny_qwen2")) / name, folder / name)
    return folder


def one_run(workdir: Path, threads: str, steps: int, model_args: list[str]) -> dict:
    args = [sys.executable, "-m", "cpo_exp", f"train.max_steps={steps}", "train.eval_steps=null",
            "train.save_steps=null", "train.save_model=false", "tracking=none", *model_args]
    if threads != "auto":
        args.append(f"hardware.num_threads={threads}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    started = time.perf_counter()
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(args)}):\n{done.stderr[-3000:]}")
    summary = SUMMARY.search(done.stderr)
    used = THREADS_LINE.search(done.stderr)
    return {"wall": wall, "steps": float(summary.group(2)), "threads_used": int(used.group(1)) if used else None}


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/threads.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "cpu-small"), default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", default="auto,1,2", help="comma-separated: auto and/or numbers")
    parser.add_argument("--loads", default="0,1,2", help="busy processes beside the run, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    settings = args.threads.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_args = []
        if args.model == "cpu-small":
            model_args = ["model=hf", f"model.name_or_path={cpu_small_folder(workdir)}", "model.random_init=true",
                          "train.learning_rate=1e-3"]
        one_run(workdir, "1", 2, model_args)  # warm the tokenized-data cache and the file cache
        results = []
        for load in map(int, args.loads.split(",")):
            spinners = busy(load)
            try:
                time.sleep(2 if load else 0)
                for _ in range(args.repeats):
                    for threads in settings:  # alternated, so drifts of the machine hit every setting alike
                        r = one_run(workdir, threads, args.steps, model_args)
                        results.append({"load": load, "threads": threads, "loadavg": os.getloadavg()[0], **r})
                        print(f"load {load} threads {threads}: wall {r['wall']:.1f}s steps {r['steps']:.1f}s "
                              f"(threads used {r['threads_used']}, loadavg {os.getloadavg()[0]:.1f})", flush=True)
            finally:
                for p in spinners:
                    p.kill()
    print(f"\n{args.model}, {args.steps} steps, {os.cpu_count()} cores, median of {args.repeats}:")
    print("| busy processes | threads | wall | steps | wall / idle wall |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for threads in settings:
        cells = {}
        for load in map(int, args.loads.split(",")):
            rows = [r for r in results if r["load"] == load and r["threads"] == threads]
            cells[load] = (statistics.median(r["wall"] for r in rows), statistics.median(r["steps"] for r in rows))
        idle = cells.get(0, (None,))[0]
        for load, (wall, steps) in cells.items():
            ratio = f"{wall / idle:.2f}x" if idle else "-"
            print(f"| {load} | {threads} | {wall:.1f} s | {steps:.1f} s | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
