"""Benchmark: our engine's pair forward variants against TRL's ``CPOTrainer`` on one workload.

``python benchmarks/bench.py --workload cpu-small`` runs every variant (``--variants``: ``trl``
and the keys of :data:`VARIANTS`) in a fresh subprocess (so that peak memory is each
variant's own), one after the other, on the same randomly
initialised model (same seed), the same synthetic preference pairs and the same batches, and
prints tokens/s, time per step, peak memory and the metrics after the last step, with the
ratios ours/TRL. ``--out FILE`` writes the figures as JSON.

The script lives beside the package, not in it (the wheel carries only ``cpo_exp``): run it
from a checkout with the project installed (``pip install -e ".[dev]"``; TRL comes with
``dev``). Measured figures, each with its command: ``docs/performance.md``.

What is measured, for every variant alike: a training loop of ``steps`` optimizer steps
(collate the batch, loss and metrics, backward, clip the gradient norm to 1, AdamW step).
TRL's step is ``CPOTrainer.get_batch_loss_metrics`` on batches from TRL's own tokenization
and data collator (what ``CPOTrainer.train`` runs per step, without the Trainer's callbacks
and logging); ours is :func:`cpo_exp.engine.pair_loss` on batches from our tokenization and
collators, with metrics kept on the device until the end as the engine does. The first step
is a warm-up and is not timed. Tokens are the non-pad tokens of every chosen and rejected
sequence (prompt included in each), the same count for every variant.

Peak memory: on CUDA the maximum allocated bytes during the loop; on CPU the growth of the
peak resident set size during the loop over the resident size just before it (the kernel's
peak counter is reset first).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from cpo_exp.config import EngineConfig

# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A model shape, a length distribution and a schedule. Lengths are in tokens."""

    name: str
    model: dict
    vocab_size: int
    pairs: int = 8  # per batch
    steps: int = 5
    prompt_median: float = 64
    completion_median: float = 48
    sigma: float = 1.0  # log-normal spread: a long right tail
    max_prompt: int = 512
    max_completion: int = 511
    dtype: str = "float32"
    device: str = "cpu"
    learning_rate: float = 1e-4
    chunk_size: int = 512
    seed: int = 0


QWEN2_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                  tie_word_embeddings=True)

WORKLOADS = {
    "cpu-small": Workload(
        "cpu-small",
        dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
        vocab_size=32000,
    ),
    "gpu-0.5b": Workload("gpu-0.5b", QWEN2_0_5B, vocab_size=151936, steps=10, prompt_median=256,
                         completion_median=192, dtype="bfloat16", device="cuda", learning_rate=1e-5,
                         chunk_size=1024),
    # Seconds on a CPU: for the test that the benchmark runs at all.
    "tiny": Workload(
        "tiny",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
        vocab_size=300, pairs=2, steps=3, prompt_median=12, completion_median=8, max_prompt=48,
        max_completion=47,
    ),
}

VARIANTS = {
    "plain": EngineConfig(),
    "chunked": EngineConfig(logits="chunked"),
    "packed": EngineConfig(logits="chunked", packing=True),
    "packed+shared_prompt": EngineConfig(logits="chunked", packing=True, shared_prompt=True),
}
TRL = "trl"


# --------------------------------------------------------------------------- data and model


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose words are token ids: ``"w17 w5"`` is ``[17, 5]``.

    Text built from these words tokenizes to exactly the intended ids in TRL's pipeline and in
    ours alike (a completion " w9 ..." appended to a prompt splits at the space).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _lengths(rng, median: float, sigma: float, low: int, high: int, n: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def synthetic_rows(w: Workload, prompt_scale: float = 1.0) -> list[dict[str, str]]:
    """``steps x pairs`` preference rows with long-tailed prompt and completion lengths.

    BOS and EOS are added by tokenization, so a prompt has at most ``max_prompt - 1`` words and
    a completion ``max_completion - 1``: no row is ever truncated (TRL and we would truncate
    differently).
    """
    rng = np.random.default_rng(w.seed)
    n = w.steps * w.pairs
    prompts = _lengths(rng, w.prompt_median * prompt_scale, w.sigma, 1, w.max_prompt - 1, n)
    chosen = _lengths(rng, w.completion_median, w.sigma, 1, w.max_completion - 1, n)
    rejected = _lengths(rng, w.completion_median, w.sigma, 1, w.max_completion - 1, n)

    def words(k: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(3, w.vocab_size, k))

    return [{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
            for p, c, r in zip(prompts, chosen, rejected)]


def build_model(w: Workload):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=w.vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         attention_dropout=0.0, **w.model)
    torch.manual_seed(w.seed)
    model = Qwen2ForCausalLM(config).to(dtype=getattr(torch, w.dtype), device=w.device)
    model.config.use_cache = False
    return model


def num_parameters(w: Workload) -> int:
    """Parameter count of the workload's model (built on the meta device: no memory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=w.vocab_size, **w.model))
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- one variant


def _rss_bytes(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or peak RSS growth on CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:  # reset the kernel's peak-RSS counter (VmHWM) to the current RSS
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.reset = True
            except OSError:
                self.reset = False
            self.start = _rss_bytes("VmRSS") or 0
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.growth = self.peak - self.start
        else:
            peak = _rss_bytes("VmHWM") if self.reset else None
            if peak is None:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak = peak
            self.growth = peak - self.start


def _trl_steps(w: Workload, model, tokenizer, rows):
    import datasets
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        args = CPOConfig(output_dir=tmp, max_length=w.max_prompt + w.max_completion + 1, report_to=[],
                         use_cpu=w.device == "cpu", bf16=False, per_device_train_batch_size=w.pairs,
                         beta=0.1, cpo_alpha=1.0, loss_type="sigmoid")
        trainer = CPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
    data = [trainer.train_dataset[i] for i in range(len(rows))]
    tokens = [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in data]

    def step(k: int):
        batch = trainer.data_collator(data[k * w.pairs:(k + 1) * w.pairs])
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        return loss, {"loss": loss.detach().float(), **metrics}

    return step, tokens


def _our_steps(w: Workload, model, tokenizer, rows, engine: EngineConfig):
    import datasets

    from cpo_exp.data import PairRows, SequenceLengths, tokenize_dataset
    from cpo_exp.engine import pair_loss
    from cpo_exp.forward import pair_collator, prepare_model
    from cpo_exp.losses import LossSpec

    lengths = SequenceLengths(max_length=w.max_prompt + w.max_completion + 1, max_prompt_length=w.max_prompt)
    data = tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, lengths, "bench", "error")
    pairs = PairRows(data)  # the rows the engine's data loader reads
    data = [pairs[i] for i in range(len(pairs))]
    tokens = [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in data]
    prepare_model(model, engine)  # as engine.train does
    collate = pair_collator(model.config, tokenizer, engine)
    spec = LossSpec("sigmoid", beta=0.1, cpo_alpha=1.0)

    def step(k: int):
        batch = collate(data[k * w.pairs:(k + 1) * w.pairs])
        batch = {key: v.to(w.device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
        return pair_loss(model, batch, spec, engine=engine)

    return step, tokens


def run_variant(w: Workload, variant: str, prompt_scale: float = 1.0) -> dict:
    """Train ``w.steps`` steps with one variant in this process; its figures as a dict."""
    tokenizer = word_tokenizer(w.vocab_size)
    rows = synthetic_rows(w, prompt_scale)
    model = build_model(w)
    model.train()
    if variant == TRL:
        step, tokens = _trl_steps(w, model, tokenizer, rows)
    else:
        step, tokens = _our_steps(w, model, tokenizer, rows, VARIANTS[variant])
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.learning_rate)
    sync = torch.cuda.synchronize if w.device == "cuda" else (lambda: None)
    times, last = [], {}
    with PeakMemory(w.device) as memory:
        for k in range(w.steps):
            sync()
            start = time.perf_counter()
            loss, metrics = step(k)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
            last = metrics
    final = {name: float(v) for name, v in last.items()}
    timed = times[1:] or times
    timed_tokens = sum(sum(tokens[k * w.pairs:(k + 1) * w.pairs]) for k in range(w.steps - len(timed), w.steps))
    return {
        "variant": variant,
        "engine": asdict(VARIANTS[variant]) if variant in VARIANTS else None,
        "tokens_per_second": timed_tokens / sum(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "step_seconds": times,
        "peak_memory_bytes": memory.peak,
        "peak_memory_growth_bytes": memory.growth,
        # what the ratio to TRL compares: CUDA max allocated, or peak RSS growth on CPU
        "memory_bytes": memory.peak if w.device == "cuda" else memory.growth,
        "final_metrics": final,
    }


# --------------------------------------------------------------------------- the comparison


@dataclass
class Conditions:
    workload: str
    threads: int
    device: str
    load_average_before: tuple = ()
    load_average_after: tuple = ()
    torch: str = torch.__version__
    prompt_scale: float = 1.0
    tokens: dict = field(default_factory=dict)


def token_stats(w: Workload, prompt_scale: float) -> dict:
    """Real and padded token counts of the workload's batches, and the prompt share."""
    tokenizer = word_tokenizer(w.vocab_size)
    rows = synthetic_rows(w, prompt_scale)
    real = padded = prompt = 0
    for k in range(w.steps):
        batch = rows[k * w.pairs:(k + 1) * w.pairs]
        lens = []
        for r in batch:
            p = len(tokenizer(r["prompt"])["input_ids"]) + 1
            c = len(tokenizer(r["chosen"])["input_ids"]) + 1
            j = len(tokenizer(r["rejected"])["input_ids"]) + 1
            lens += [p + c, p + j]
            prompt += 2 * p
        real += sum(lens)
        padded += len(lens) * max(lens)
    return {"real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded,
            "prompt_share": prompt / real}


def compare(results: list[dict]) -> dict:
    """Ratios ours/TRL and the largest metric differences, per variant."""
    trl = next((r for r in results if r["variant"] == TRL), None)
    if trl is None:
        return {}
    out = {}
    for r in results:
        if r["variant"] == TRL:
            continue
        diffs = {name: abs(r["final_metrics"][name] - value) for name, value in trl["final_metrics"].items()
                 if name in r["final_metrics"]}
        # relative to the magnitude (at least 1): a sum of ~1000 float32 log-probs near -1300
        # is only known to ~1e-4 absolute, whichever order the additions take
        relative = {name: d / max(1.0, abs(trl["final_metrics"][name])) for name, d in diffs.items()}
        out[r["variant"]] = {
            "tokens_per_second_ratio": r["tokens_per_second"] / trl["tokens_per_second"],
            "peak_memory_ratio": r["memory_bytes"] / trl["memory_bytes"],
            "metric_abs_diff": diffs,
            "max_metric_abs_diff": max(diffs.values()),
            "max_metric_rel_diff": max(relative.values()),
            "max_metric_rel_diff_excluding_logits": max(v for k, v in relative.items()
                                                        if not k.startswith("logits/")),
        }
    return out


def _worker(args) -> None:
    import datasets

    datasets.disable_progress_bars()
    w = WORKLOADS[args.workload]
    if args.steps:
        w = Workload(**{**asdict(w), "steps": args.steps})
    result = run_variant(w, args.worker, args.prompt_scale)
    with open(args.result, "w") as handle:
        json.dump(result, handle)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="cpu-small", choices=sorted(WORKLOADS))
    parser.add_argument("--variants", default=",".join([TRL, *VARIANTS]),
                        help="comma-separated, from: " + ", ".join([TRL, *VARIANTS]))
    parser.add_argument("--steps", type=int, default=0, help="override the workload's number of steps")
    parser.add_argument("--repeats", type=int, default=1, help="run the variant list this many times, "
                        "alternating; each variant's fastest run is reported")
    parser.add_argument("--prompt-scale", type=float, default=1.0, help="multiply the median prompt length")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU, for MFU (989 for H100/H200 SXM)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}

    w = WORKLOADS[args.workload]
    if args.steps:
        w = Workload(**{**asdict(w), "steps": args.steps})
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v != TRL and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {[TRL, *VARIANTS]}")
    if TRL in variants and importlib.util.find_spec("trl") is None:
        print("TRL is not installed (pip install 'cpo_exp[dev]'): measuring our engine only", file=sys.stderr)
        variants.remove(TRL)
    if w.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"workload {w.name} needs a CUDA device and none is available")
    conditions = Conditions(w.name, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())), w.device,
                            os.getloadavg(), prompt_scale=args.prompt_scale,
                            tokens=token_stats(w, args.prompt_scale))
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in variants:
                path = os.path.join(tmp, f"{variant}-{repeat}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--workload", w.name, "--worker", variant,
                       "--result", path, "--steps", str(w.steps), "--prompt-scale", str(args.prompt_scale)]
                subprocess.run(cmd, check=True)
                result = json.load(open(path))
                print(f"  {variant:<22} {result['tokens_per_second']:>9.1f} tok/s  "
                      f"{result['seconds_per_step']:.3f} s/step  "
                      f"{result['memory_bytes'] / 2**20:>8.1f} MiB", flush=True)
                if variant not in best or result["tokens_per_second"] > best[variant]["tokens_per_second"]:
                    best[variant] = result
    conditions.load_average_after = os.getloadavg()
    results = [best[v] for v in variants]
    report = {
        "conditions": asdict(conditions),
        "workload": asdict(w),
        "num_parameters": num_parameters(w),
        "results": results,
        "vs_trl": compare(results),
    }
    if w.device == "cuda":
        # Model FLOPs utilisation: 6 x params x tokens/s over the card's dense bf16 peak.
        report["device_name"] = torch.cuda.get_device_name()
        report["peak_tflops"] = args.peak_tflops
        for r in results:
            r["mfu"] = 6 * report["num_parameters"] * r["tokens_per_second"] / (args.peak_tflops * 1e12)
    _print(report)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


def _print(report: dict) -> None:
    c = report["conditions"]
    t = c["tokens"]
    print(f"\nworkload {c['workload']} ({report['num_parameters'] / 1e6:.1f}M params), {c['threads']} threads, "
          f"device {c['device']}, load {c['load_average_before'][0]:.2f} -> {c['load_average_after'][0]:.2f}")
    print("max rel dmetric: the largest |ours - TRL| / max(1, |TRL|) over the final metrics")
    print(f"tokens: {t['real_tokens']} real, {t['padded_tokens']} padded ({t['padding_share']:.0%} padding), "
          f"prompt share {t['prompt_share']:.0%}")
    vs = report["vs_trl"]
    print(f"{'variant':<22} {'tok/s':>9} {'s/step':>8} {'mem MiB':>9} {'x TRL tok/s':>11} {'x TRL mem':>9} "
          f"{'max rel dmetric':>15} {'(no logits/*)':>13}")
    for r in report["results"]:
        line = (f"{r['variant']:<22} {r['tokens_per_second']:>9.1f} {r['seconds_per_step']:>8.3f} "
                f"{r['memory_bytes'] / 2**20:>9.1f}")
        if r["variant"] in vs:
            v = vs[r["variant"]]
            line += (f" {v['tokens_per_second_ratio']:>11.2f} {v['peak_memory_ratio']:>9.2f} "
                     f"{v['max_metric_rel_diff']:>15.2e} {v['max_metric_rel_diff_excluding_logits']:>13.2e}")
        if "mfu" in r:
            line += f"  MFU {r['mfu']:.1%}"
        print(line)


if __name__ == "__main__":
    main()
