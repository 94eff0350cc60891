"""COCO caption metrics.

- ``ptb``: a pure-Python PTB tokenizer equal to pycocoevalcap's Java one (``ptb_tokenize``).
- ``cider``: a fast CIDEr-D equal to pycocoevalcap's (``cider``, ``cider_per_image``), without Java.
- ``coco``: the official COCO caption protocol, pycocoevalcap's scorers run on a results file
  (``coco_caption_scores``; ``coco_caption_evaluation`` also gives each image's CIDEr).
"""

from raylora.metrics.cider import cider, cider_per_image
from raylora.metrics.coco import coco_caption_evaluation, coco_caption_scores, format_scores
from raylora.metrics.ptb import PUNCTUATIONS, clear_caches, ptb_tokenize, ptb_tokenize_lines

__all__ = [
    "PUNCTUATIONS",
    "ptb_tokenize",
    "ptb_tokenize_lines",
    "clear_caches",
    "cider",
    "cider_per_image",
    "coco_caption_evaluation",
    "coco_caption_scores",
    "format_scores",
]
