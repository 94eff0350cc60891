"""Qwen2.5-VL and Qwen3-VL: see :mod:`raylora.families.qwen_vl.family`."""

from raylora.families.qwen_vl.family import QwenVL, mrope_positions

__all__ = ["QwenVL", "mrope_positions"]
