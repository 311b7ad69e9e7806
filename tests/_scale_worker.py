"""Subprocess side of tests/test_sharding.py and tests/test_distributed.py (XLA flags and jax.distributed must be set
before jax starts, so these run in fresh interpreters).

    python tests/_scale_worker.py run WORKDIR MESH_CLIENTS NUM_CLIENTS [CLIENT_LANES [CLIENTS_PER_ROUND]]
    python tests/_scale_worker.py merge                    # sharded merge == host merge, all-reduce in the HLO
    python tests/_scale_worker.py proc PROCESS_ID NUM_PROCESSES PORT WORKDIR NUM_CLIENTS
    python tests/_scale_worker.py pool [--no-lorm-jax]     # the host runs far ahead of a collective (issue 17)

Each prints one JSON line prefixed with ``RESULT `` on stdout. The runs compute in float64 (64-bit JAX, a float64
backbone and merges): runs with different numbers of devices, processes and lanes then agree to ~1e-12, where float32
rounding of differently batched matmuls, amplified by AdamW, would give machine-dependent differences.
"""
import json
import os
import sys

os.environ.setdefault("JAX_ENABLE_X64", "1")  # before jax is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(num_clients: int, mesh_clients: int = 0, client_lanes: int = 0, clients_per_round: int = 0):
    from conftest import ONE_BLOCK, small_config
    c = small_config(**ONE_BLOCK, num_clients=num_clients, mesh_clients=mesh_clients, client_lanes=client_lanes,
                     clients_per_round=clients_per_round, merge_dtype="float64")
    c.backbone.options.compute_dtype = "float64"
    return c


def summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return {"accuracy_matrix": results["accuracy_matrix"], "final": results["final_average_accuracy"],
            "client_loss": [m["client_loss"] for m in lines if "client_loss" in m],
            "clients": [m["clients"] for m in lines if "clients" in m and "client_loss" in m]}


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
        per_round = int(argv[5]) if len(argv) > 5 else 0
        continual.run(config(k, mesh, lanes, per_round), workdir, progress=False)
        out = {"devices": jax.device_count(), **summary(workdir)}
    elif mode == "merge":
        out = merge_check()
    elif mode == "pool":
        out = pool_check(import_lorm_jax="--no-lorm-jax" not in argv)
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


def pool_check(import_lorm_jax: bool = True, rounds: int = 2, burst: int = 40, steps: int = 1_000_000) -> dict:
    """The launch pattern that starves XLA's CPU thread pool (issue 17), deterministically, on N >= 3 devices.

    A collective program C on the first N - 1 devices waits for a slow single-device program D on the last one (the
    host does not wait), and the host queues ``burst`` small eager all-gathers behind C: more than the 32
    computations XLA lets a device have in flight, so the launcher tasks of the next one block, N - 1 pool threads.
    D holds the N-th. When D ends, C needs N - 1 threads at once and gets one: with XLA's pool of ``max(cores, N)``
    threads it waits in the rendezvous until XLA aborts (or hangs); with the ``2 N`` threads :mod:`lorm_jax.runtime`
    sets it finishes. ``import_lorm_jax=False`` runs it with XLA's defaults.
    """
    if import_lorm_jax:
        import lorm_jax  # noqa: F401  (configures the runtime before the backend starts)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    devices = jax.devices()
    mesh = Mesh(np.asarray(devices[:-1]), ("c",))
    n = mesh.size
    shard, repl = NamedSharding(mesh, P("c")), NamedSharding(mesh, P())
    x = jax.device_put(np.ones((n, 64), np.float32), shard)
    w = jax.device_put(jnp.full((64, 64), 1.0 / 64, jnp.float32), devices[-1])
    slow = jax.jit(lambda v: jax.lax.fori_loop(0, steps, lambda i, y: jnp.tanh(y @ w), v))  # seconds on one core
    combine = jax.jit(lambda x, d: x + x.sum(0) + d.sum(), out_shardings=shard)  # an all-reduce over the mesh
    total = 0.0
    for _ in range(rounds):
        d = slow(jax.device_put(jnp.ones((4, 64), jnp.float32), devices[-1]))
        y = combine(x, jax.device_put(d, repl))
        outs = [y[: max(1, n // 2)] for _ in range(burst)]  # eager programs on a sharded array: all-gathers
        total += float(sum(np.asarray(o).sum() for o in outs))
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return {"devices": len(devices), "finite": bool(np.isfinite(total)),
            "intra_op_threads": threads.count("tf_XLAEigen"), "pjrt_nproc": os.environ.get("PJRT_NPROC")}


if __name__ == "__main__":
    main(sys.argv[1:])
