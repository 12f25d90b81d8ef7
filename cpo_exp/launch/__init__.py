"""accelerate launcher configs, one per distributed ``hardware`` preset (``accelerate launch --config_file``).

They set only what the strategy needs; ``num_processes`` defaults to the GPUs of one machine and
is overridden on the command line (``--num_processes``, ``--num_machines``...).
"""

from pathlib import Path

PRESETS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def config_file(preset: str) -> Path:
    """Path of the accelerate config file for ``hardware=<preset>``."""
    if preset not in PRESETS:
        raise ValueError(f"no accelerate config for hardware={preset}; one of {', '.join(PRESETS)}")
    return Path(__file__).resolve().parent / f"{preset}.yaml"
