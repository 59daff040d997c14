"""jaxinfer: a JAX/XLA inference engine for large language models."""

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # Imported on first use so `import jaxinfer` (and the gRPC client) stays light.
    if name == "LLM":
        from jaxinfer.llm import LLM
        return LLM
    if name == "SamplingParams":
        from jaxinfer.core.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
