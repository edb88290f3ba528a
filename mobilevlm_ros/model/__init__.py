"""Exact MobileVLM inference in plain PyTorch. No ROS imports here: this runs anywhere torch does."""
from .choices import MAX_CHOICES, Choice
from .errors import CheckpointError, PromptTooLongError
from .generate import SamplingParams
from .loader import load_model
from .pipeline import Answer, MobileVLMPipeline
from .tokenizer import Tokenizer

__all__ = ["MAX_CHOICES", "Answer", "CheckpointError", "Choice", "MobileVLMPipeline", "PromptTooLongError", "SamplingParams", "Tokenizer",
           "load_model"]
