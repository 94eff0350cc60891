"""raylora: LoRA fine-tuning of InternVL2 vision-language models as a Ray application."""

from raylora.telemetry import disable_telemetry
from raylora.versions import check_versions

__version__ = "0.1.0"

check_versions()  # an installed library below raylora's floor: one line naming it (raylora.versions)
disable_telemetry()  # before any library that phones home is imported (raylora.telemetry)
