"""The benchmarks behind the ``lorm-jax bench-*`` verbs (docs/BENCHMARKS.md).

* :mod:`lorm_jax.bench.merge`: the jitted server merge against a float64 ``pinv`` loop (``lorm-jax bench-merge``).
* :mod:`lorm_jax.bench.clients`: local-training throughput on ragged clients, padded vmap vs lanes vs a loop
  (``lorm-jax bench-clients``).
* :mod:`lorm_jax.bench.accelerator`: the paper-scale round and merges on an accelerator, beside
  :mod:`lorm_jax.bench.reference_torch`, a PyTorch model of the reference's loop (``lorm-jax bench-accelerator``).
* :mod:`lorm_jax.bench.common`: what they share (timing, number formatting, ViT LoRA shapes, machine info).
"""
