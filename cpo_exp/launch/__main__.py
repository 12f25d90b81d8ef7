"""``python -m cpo_exp.launch <preset>``: the path of its accelerate config, for shell substitution:

    accelerate launch --config_file $(python -m cpo_exp.launch fsdp) -m cpo_exp hardware=fsdp ...
"""

import sys

from cpo_exp.launch import PRESETS, config_file

if __name__ == "__main__":
    preset = sys.argv[1] if len(sys.argv) > 1 else "ddp"
    if preset not in PRESETS:
        sys.exit(f"python -m cpo_exp.launch: no accelerate config for hardware={preset}; one of {', '.join(PRESETS)}")
    print(config_file(preset))
