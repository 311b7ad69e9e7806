"""lorm_jax.runtime: the XLA CPU runtime settings for simulated devices (issue 17), as a pure function of the
environment; the end-to-end effect is checked by tests/test_stress.py."""
from lorm_jax import runtime

NEW = (0, 10, 2)


def test_one_device_changes_nothing():
    assert runtime.settings({}, cores=2, jaxlib_version=NEW) == {}
    assert runtime.settings({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, cores=2,
                            jaxlib_version=NEW) == {}


def test_device_count_from_flags_or_jax_num_cpu_devices():
    assert runtime.host_device_count({"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --foo "
                                                   "--xla_force_host_platform_device_count=8"}) == 8  # last wins
    assert runtime.host_device_count({"JAX_NUM_CPU_DEVICES": "4", "XLA_FLAGS": ""}) == 4
    assert runtime.host_device_count({"JAX_NUM_CPU_DEVICES": "-1",
                                      "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == 3  # -1: unset


def test_pool_is_twice_the_devices_and_flags_are_appended():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    new = runtime.settings(env, cores=2, jaxlib_version=NEW)
    assert new["PJRT_NPROC"] == "16"
    assert new["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
    assert f"--xla_cpu_collective_call_terminate_timeout_seconds={runtime.RENDEZVOUS_TERMINATE_S}" in new["XLA_FLAGS"]
    assert f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={runtime.RENDEZVOUS_WARN_S}" in new["XLA_FLAGS"]
    assert runtime.settings(env, cores=32, jaxlib_version=NEW)["PJRT_NPROC"] == "32"  # never below the cores


def test_user_settings_are_kept():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=30", "NPROC": "4"}
    new = runtime.settings(env, cores=2, jaxlib_version=NEW)
    assert "PJRT_NPROC" not in new  # the user's NPROC (or PJRT_NPROC) sizes the pool
    assert new["XLA_FLAGS"].count("terminate_timeout") == 1 and "seconds=30" in new["XLA_FLAGS"]
    assert "warn_stuck_timeout_seconds" in new["XLA_FLAGS"]


def test_unverified_jaxlib_gets_no_timeout_flags():
    """XLA aborts on flags it does not know, so the timeouts are only added to jaxlib releases known to have them."""
    new = runtime.settings({"JAX_NUM_CPU_DEVICES": "8"}, cores=2, jaxlib_version=(0, 4, 35))
    assert new == {"PJRT_NPROC": "16"}


def test_configure_writes_the_environment_only_before_the_backend_starts(monkeypatch):
    monkeypatch.setattr(runtime, "backend_started", lambda: False)
    env = {"JAX_NUM_CPU_DEVICES": "3"}
    applied = runtime.configure(env)
    assert applied["PJRT_NPROC"] == env["PJRT_NPROC"]
    monkeypatch.setattr(runtime, "backend_started", lambda: True)  # too late: the pool already exists
    assert runtime.configure({"JAX_NUM_CPU_DEVICES": "3"}) == {}
