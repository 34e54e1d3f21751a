"""The production pipeline: stages (`stages`), the resumable runner (`runner`), the report (`report`)."""

from .runner import run_pipeline, stop_server, validate_config
from .stages import REPORT_FILE, STAGE_NAMES, STAGES, STATE_FILE, PipelineConfig, PipelineError

__all__ = [
    "REPORT_FILE",
    "STAGES",
    "STAGE_NAMES",
    "STATE_FILE",
    "PipelineConfig",
    "PipelineError",
    "run_pipeline",
    "stop_server",
    "validate_config",
]
