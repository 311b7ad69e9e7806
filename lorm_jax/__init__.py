"""lorm_jax: closed-form merging of LoRA modules (LoRM) for federated class-incremental learning."""
from lorm_jax import runtime as _runtime

_runtime.configure()  # XLA CPU runtime settings for simulated devices; must precede jax's backend (lorm_jax.runtime)

__version__ = "0.1.0"
