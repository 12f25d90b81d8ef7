"""One rank of ``test_scale.py::test_lean_engine_under_fsdp2_gives_the_full_batch_gradients``.

Run by ``torch.distributed.run`` on 2 gloo processes on CPU. accelerate sets FSDP up only on
GPUs, so its own ``fsdp2_prepare_model`` (auto-wrap by ``_no_split_modules``, embedding and
tail units, root) is called with a stand-in for the accelerator. Each rank trains on its half
of the pairs; it writes to ``rank-<r>.json`` how far its gathered gradients are from one
process's on all pairs, and whether generation (through the root's forward) still runs.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

from cpo_exp.config import EngineConfig, ModelConfig
from cpo_exp.data import SequenceLengths, tokenize_row
from cpo_exp.engine import pair_loss
from cpo_exp.forward import pair_collator, prepare_model
from cpo_exp.losses import LossSpec
from cpo_exp.models import load_model, load_tokenizer

TINY = ModelConfig(name_or_path="pkg://cpo_exp/assets/tiny_qwen2", random_init=True)
LEAN = EngineConfig(logits="chunked", packing=True, shared_prompt=True)
SPEC = LossSpec("sigmoid", beta=0.1, cpo_alpha=0.0)  # a mean over pairs: halves average to the whole


def fresh_model(tokenizer):
    torch.manual_seed(0)
    model = load_model(TINY, tokenizer)
    prepare_model(model, LEAN)  # as engine.train does before accelerate prepares the model
    return model


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = load_tokenizer(TINY)
    rows = [tokenize_row(r, tokenizer, SequenceLengths()) for r in json.loads(Path(sys.argv[1]).read_text())]
    collate = pair_collator(None, tokenizer, LEAN)

    reference = fresh_model(tokenizer)
    pair_loss(reference, collate(rows), SPEC, engine=LEAN)[0].backward()

    model = fresh_model(tokenizer)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            cpu_ram_efficient_loading=False, state_dict_type="SHARDED_STATE_DICT")
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"))
    model = fsdp2_prepare_model(accelerator, model)
    half = len(rows) // 2
    pair_loss(model, collate(rows[rank * half:(rank + 1) * half]), SPEC, engine=LEAN)[0].backward()

    expected = dict(reference.named_parameters())
    worst = max(float((p.grad.full_tensor() - expected[n].grad).abs().max() / expected[n].grad.abs().max())
                for n, p in model.named_parameters())
    with torch.no_grad():  # an ordinary call: the packed attention falls back to SDPA
        generated = model.generate(input_ids=torch.tensor([[0, 5, 6]]), max_new_tokens=3, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    sharded = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")})
    result = {"rank": rank, "grad_rel_diff": worst, "generated": generated.shape[1], "units": sharded}
    Path(f"rank-{rank}.json").write_text(json.dumps(result))  # one file each: stdout lines of ranks interleave
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
