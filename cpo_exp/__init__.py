"""cpo_exp: Contrastive Preference Optimization and its family, configured with Hydra."""

import time as _time

__version__ = "0.1.0"

# When this process began to import cpo_exp: where a run's wall clock starts (its time summary).
IMPORTED_AT = _time.perf_counter()
