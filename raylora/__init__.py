"""raylora: LoRA fine-tuning of InternVL2 vision-language models as a Ray application."""

__version__ = "0.1.0"
