"""lorm_jax: closed-form merging of LoRA modules (LoRM) for federated class-incremental learning."""

__version__ = "0.1.0"
