"""One Ray cluster for the whole test session (a start-stop cycle costs ~7 s here)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from zcbench.suites.cluster import ensure_ray

    ensure_ray()
    yield ray
