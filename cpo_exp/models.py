"""Load a model and its tokenizer from a local folder or a hub id (one code path for both).

Where a name points is decided by :mod:`cpo_exp.hub` before anything is downloaded: a hub id
that cannot be reached is read from the local cache, or stops the run with one line.

Causal LMs and encoder-decoders are both supported; which one a folder holds is read from its
``config.json`` (``is_encoder_decoder``).
"""

from __future__ import annotations

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from cpo_exp.config import ModelConfig
from cpo_exp.hub import locate_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token guaranteed (EOS stands in when there is none, as in TRL)."""
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    where = locate_model(cfg.tokenizer or cfg.name_or_path, key, cfg.revision)
    tokenizer = AutoTokenizer.from_pretrained(
        where.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, token=cfg.token,
        local_files_only=where.local_files_only,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {cfg.name_or_path} has no EOS token; completions need one")
    return tokenizer


def is_encoder_decoder(cfg: ModelConfig) -> bool:
    """Read from the model's config alone (cheap: no weights), so data can be prepared first."""
    where = locate_model(cfg.name_or_path, "model.name_or_path", cfg.revision)
    config = AutoConfig.from_pretrained(where.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                        token=cfg.token, local_files_only=where.local_files_only)
    return bool(getattr(config, "is_encoder_decoder", False))


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Load weights, or build fresh ones from the folder's config when ``random_init`` is set."""
    where = locate_model(cfg.name_or_path, "model.name_or_path", cfg.revision)
    config = AutoConfig.from_pretrained(where.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                        token=cfg.token, local_files_only=where.local_files_only)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    dtype = _DTYPES.get(cfg.dtype, "auto")
    if cfg.random_init:
        model = auto.from_config(config, dtype=dtype if dtype != "auto" else None, **kwargs)
    else:
        model = auto.from_pretrained(where.path, dtype=dtype, revision=cfg.revision, token=cfg.token,
                                     local_files_only=where.local_files_only, **kwargs)
    # The model must agree with the tokenizer on padding from the start (generation uses it).
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.peft == "lora":
        model = with_lora(model, cfg)
    return model


def with_lora(model: PreTrainedModel, cfg: ModelConfig):
    """Freeze the model and add LoRA adapters (``peft``); ``save_pretrained`` then writes only them."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("model.peft=lora needs the peft library: pip install 'cpo_exp[peft]'") from None
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    lora = LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules) if cfg.lora_target_modules else None)
    return get_peft_model(model, lora)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to zero (TRL's ``disable_dropout``).

    Attention dropout in transformers is a float attribute of the attention module, not an
    ``nn.Dropout``, so it is zeroed too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
