"""splitserve: disaggregated prefill/decode LLM serving on JAX.

The subpackages live in the repository's top-level folders (see pyproject.toml):
splitserve.models, splitserve.pallas_kernels, splitserve.protos, splitserve.runtime,
splitserve.scripts.
"""

__version__ = "0.1.0"
