"""InternVL 2 to 3.5 (original and ``-hf`` checkpoints): see :mod:`raylora.families.internvl.family`."""

from raylora.families.internvl.family import (
    LLM_FAMILIES,
    InternVL,
    LLMFamily,
    image_processor_for,
    llm_family,
)

__all__ = ["LLM_FAMILIES", "InternVL", "LLMFamily", "image_processor_for", "llm_family"]
