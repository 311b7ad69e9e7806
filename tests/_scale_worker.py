"""Subprocess side of tests/test_sharding.py and tests/test_distributed.py (XLA flags and jax.distributed must be set
before jax starts, so these run in fresh interpreters).

    python tests/_scale_worker.py run WORKDIR MESH_CLIENTS NUM_CLIENTS [CLIENT_LANES]
    python tests/_scale_worker.py merge                    # sharded merge == host merge, all-reduce in the HLO
    python tests/_scale_worker.py proc PROCESS_ID NUM_PROCESSES PORT WORKDIR NUM_CLIENTS

Each prints one JSON line prefixed with ``RESULT `` on stdout. The runs compute in float64 (64-bit JAX, a float64
backbone and merges): runs with different numbers of devices, processes and lanes then agree to ~1e-12, where float32
rounding of differently batched matmuls, amplified by AdamW, would give machine-dependent differences.
"""
import json
import os
import sys

os.environ.setdefault("JAX_ENABLE_X64", "1")  # before jax is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(num_clients: int, mesh_clients: int = 0, client_lanes: int = 0):
    from tests._tiny import tiny_config
    c = tiny_config(num_clients=num_clients, mesh_clients=mesh_clients, client_lanes=client_lanes,
                    merge_dtype="float64")
    c.backbone.options.compute_dtype = "float64"
    return c


def summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line).get("client_loss") for line in f]
    return {"accuracy_matrix": results["accuracy_matrix"], "final": results["final_average_accuracy"],
            "client_loss": [x for x in losses if x is not None]}


def main(argv):
    mode = argv[0]
    if mode == "proc":
        pid, nproc, port, workdir, k = int(argv[1]), int(argv[2]), argv[3], argv[4], int(argv[5])
        from lorm_jax import distributed
        distributed.initialize(distributed.launch_from(f"localhost:{port}", nproc, pid))
        import jax
        from lorm_jax import continual
        continual.run(config(k), workdir, progress=False)
        out = {"process_index": jax.process_index(), "devices": jax.device_count(),
               "local_devices": jax.local_device_count()}
        if jax.process_index() == 0:
            out.update(summary(workdir))
    elif mode == "run":
        import jax
        from lorm_jax import continual
        workdir, mesh, k = argv[1], int(argv[2]), int(argv[3])
        lanes = int(argv[4]) if len(argv) > 4 else 0
        continual.run(config(k, mesh, lanes), workdir, progress=False)
        out = {"devices": jax.device_count(), **summary(workdir)}
    elif mode == "merge":
        out = merge_check()
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("RESULT " + json.dumps(out), flush=True)


def merge_check() -> dict:
    """LoRM's A and B merges and RegMean on client-sharded inputs (8 devices) vs the same inputs on the host."""
    import jax
    import numpy as np
    from lorm_jax import merging, sharding
    mesh = sharding.make_mesh(0)
    rng = np.random.default_rng(0)
    k, r, d_out, d_in = 8, 3, 12, 10
    a = rng.normal(size=(k, r, d_in)).astype(np.float32)
    b = rng.normal(size=(k, d_out, r)).astype(np.float32)
    x = rng.normal(size=(k, 20, d_in)).astype(np.float32)
    full = np.einsum("kni,knj->kij", x, x)
    diag = np.einsum("kni,kni->ki", x, x)
    fns = {"A_full": lambda a, b, g: merging.merge_lora_A(a, g), "A_diag": lambda a, b, g: merging.merge_lora_A(a, g),
           "B_full": lambda a, b, g: merging.merge_lora_B(b, a[0], g),
           "regmean_diag": lambda a, b, g: merging.regmean(b @ a, g)}
    out = {"mesh": sharding.mesh_size(mesh)}
    for name, fn in fns.items():
        g = full if "full" in name else diag
        host = np.asarray(jax.jit(fn)(a, b, g))
        sharded_args = sharding.put_clients((a, b, g), mesh)
        compiled = jax.jit(fn).lower(*sharded_args).compile()
        dist = np.asarray(compiled(*sharded_args))
        out[name] = {"max_rel_err": float(np.max(np.abs(dist - host)) / np.max(np.abs(host))),
                     "all_reduce": "all-reduce" in compiled.as_text(),
                     "input_sharded": not sharded_args[0].sharding.is_fully_replicated}
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
