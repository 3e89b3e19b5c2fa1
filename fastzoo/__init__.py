"""fastzoo: SAM, Llama-family LLMs and Vision Transformers in native PyTorch, fast on NVIDIA GPUs."""

__version__ = "0.1.0"
