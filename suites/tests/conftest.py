"""The negative-control summary (N of N checks proven to fail) at the end of a run.

Under pytest-xdist each worker records its own controls; the controller, which prints the
summary, gathers them as each worker finishes.
"""

from __future__ import annotations

import pytest

OUTCOMES = pytest.StashKey[list]()


@pytest.fixture
def control_outcomes(request: pytest.FixtureRequest) -> list:
    """Where each control test records (check id, mutant, status), and (check id, mutant, "retried", what the missed runs saw) for the summary line."""
    return request.config.stash.setdefault(OUTCOMES, [])


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand its controls to the controller
        workeroutput["zcbench_controls"] = [list(o) for o in session.config.stash.get(OUTCOMES, [])]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist's controller: keep what a finished worker's controls found, for the summary."""
    gathered = node.config.stash.setdefault(OUTCOMES, [])
    gathered.extend(tuple(o) for o in getattr(node, "workeroutput", {}).get("zcbench_controls", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    outcomes = config.stash.get(OUTCOMES, [])
    if not outcomes:
        return
    from zcbench.suites import controls
    from zcbench.suites.registry import all_checks

    # A retried control also says what its missed runs saw (status, reason, observations), so a miss can be diagnosed.
    retried = [f"{o[0]} / {o[1]} ({o[3][:400]})" for o in outcomes if o[2] == "retried"]
    outcomes = [o for o in outcomes if o[2] != "retried"]
    by_check: dict[str, list[str]] = {}
    for check_id, _, status in outcomes:
        by_check.setdefault(check_id, []).append(status)
    proven = [c for c, statuses in by_check.items() if len(statuses) == len(controls.controls_of(c)) and set(statuses) == {"fail"}]
    lacking = [c.id for c in all_checks() if c.missing_hardware()]
    caught = sum(1 for _, _, status in outcomes if status == "fail")
    terminalreporter.write_sep("=", "zcbench negative controls")
    terminalreporter.line(
        f"{len(proven)} of {len(by_check)} checks run failed every one of their controls "
        f"({caught} of {len(outcomes)} controls caught)"
        + (f"; {len(lacking)} checks need hardware this machine lacks ({', '.join(lacking)}): "
           "their controls run in results/gpu/run_gpu_check.sh" if lacking else "")
        + (f"; caught only on a later run: {', '.join(retried)}" if retried else "")
    )
