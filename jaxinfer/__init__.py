"""jaxinfer: a JAX/XLA inference engine for large language models."""

from jaxinfer.sampling import SamplingParams  # noqa: F401

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in the model loaders; import it on first use so `import jaxinfer` stays light.
    if name == "LLM":
        from jaxinfer.llm import LLM
        return LLM
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
