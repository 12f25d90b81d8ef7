"""cpo_exp: Contrastive Preference Optimization and its family, configured with Hydra."""

__version__ = "0.1.0"
