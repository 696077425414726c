"""Triton ops for DiT, each with its plain-PyTorch reference `<op>_ref` (installed as dit_fast.kernels)."""
from .bias_gelu import bias_gelu, bias_gelu_ref
from .final_layer import final_layer, final_layer_ref
from .gated_residual import gated_residual, gated_residual_ref
from .ln_modulate import gated_residual_ln_modulate, gated_residual_ln_modulate_ref, ln_modulate, ln_modulate_ref
