"""Packaging for dit_fast; kernels/ installs as dit_fast.kernels so it never shadows PyPI's `kernels`."""
from setuptools import setup

setup(
    name="dit_fast",
    version="0.1.0",
    description="Fast, tested DiT (Diffusion Transformers) training and sampling with Triton kernels",
    python_requires=">=3.10",
    packages=["dit_fast", "dit_fast.diffusion", "dit_fast.kernels"],
    package_dir={"dit_fast.kernels": "kernels"},
    package_data={"dit_fast": ["imagenet_classes.txt"]},
    install_requires=["torch", "triton", "numpy", "pillow", "tqdm"],
    extras_require={
        "vae": ["diffusers"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "apex": ["apex"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "safetensors"],
    },
)
