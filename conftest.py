"""One Ray session for the whole test run (a cluster start-stop costs seconds): the suite's own."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from zcbench.suites import session

    session.current().start()
    yield ray
