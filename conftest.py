"""One Ray session per test process (a cluster start-stop costs seconds): the suite's own.

Under pytest-xdist (``-n 2``, as tox runs the tests) each worker has its own.
"""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from zcbench.suites import session

    session.current().start()
    yield ray
