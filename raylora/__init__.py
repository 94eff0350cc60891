"""raylora: LoRA fine-tuning of InternVL2 vision-language models as a Ray application."""

from raylora.telemetry import disable_telemetry

__version__ = "0.1.0"

disable_telemetry()  # before any library that phones home is imported (raylora.telemetry)
