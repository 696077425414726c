"""dit_fast: fast, tested DiT training and sampling; a pure-PyTorch reference beside every fast path."""
from dit_fast.checkpoint import load_model
from dit_fast.config import DIT_CONFIGS, DiTConfig, get_config
from dit_fast.diffusion import create_diffusion
from dit_fast.model import DiT, create_model
from dit_fast.pipeline import Pipeline

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "Pipeline", "create_diffusion", "create_model", "get_config", "load_model"]
