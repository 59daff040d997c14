"""The engine: the step loop (engine), what enters it (input_processor) and leaves it
(output_processor on its own thread, outputs, metrics), and the one feed/drain loop every
entry point drives it with (driver)."""

from jaxinfer.core.config import EngineConfig
from jaxinfer.engine.engine import Engine

__all__ = ["Engine", "EngineConfig"]
