"""Suite-wide pytest settings."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long stress runs (tests/test_stress.py); deselect with "
                                       "-m 'not slow'")
