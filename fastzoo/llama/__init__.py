"""Llama-family LLMs: model, checkpoint conversion, tokenizers and generation."""
from .checkpoint import load_model
from .config import PRESETS, LlamaConfig, LlamaError
from .generate import GenerationOutput, Generator, generate
from .generate import SpeculativeGenerator
from .model import Transformer
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["LlamaConfig", "LlamaError", "PRESETS", "Transformer", "load_model", "Generator", "generate",
           "GenerationOutput", "Tokenizer", "load_tokenizer"]
__all__ += ["SpeculativeGenerator"]
