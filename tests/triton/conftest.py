def pytest_configure(config):
    # Imports nothing: the test module must switch on TRITON_INTERPRET before triton is first imported.
    config.addinivalue_line(
        "markers",
        "gpu_smoke: the Triton tests worth a GPU's bounded time (few kernel compiles, every kernel and dtype "
        "at full size): `python -m pytest -m gpu_smoke tests/triton` on a GPU",
    )
