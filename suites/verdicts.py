"""What an exception raised by a check means: the implementation failed, or the check could not run.

``fail`` is the implementation breaking a property: an assertion of the check, or an
exception raised by the implementation's own code (or by the model's code running on
what the implementation loaded). ``error`` is infrastructure: Ray not starting or a
node dying, a probe actor that never came up, a wait of our own that timed out, or an
exception whose innermost frame of consequence is in the suite's own machinery (a
probe that crashed). Frames in neutral libraries (torch, numpy, Ray, the standard
library, ...) decide nothing; the innermost frame outside them decides.
"""

from __future__ import annotations

import re
import sysconfig
import traceback as tb
from pathlib import Path

import ray.exceptions as rex

from .errors import InfrastructureError

#: The suite's machinery (``suites/<name>.py``): an unexpected exception raised here is our error.
INFRASTRUCTURE = frozenset({"executor", "session", "hosts", "probes", "errors", "verdicts"})
#: Libraries whose frames are neutral: what matters is who called them.
NEUTRAL_PACKAGES = frozenset({
    "torch", "numpy", "ray", "pyarrow", "cloudpickle", "hypothesis", "_pytest", "pytest", "pluggy",
    "psutil", "transformers", "tokenizers", "huggingface_hub", "safetensors", "PIL", "pandas", "importlib_metadata",
})  # fmt: skip
#: Ray failures that mean the cluster, not the implementation, broke.
RAY_INFRASTRUCTURE = (
    rex.RaySystemError,
    rex.LocalRayletDiedError,
    rex.NodeDiedError,
    rex.RuntimeEnvSetupError,
    rex.ActorUnschedulableError,
    rex.TaskUnschedulableError,
    rex.OutOfDiskError,
    rex.OutOfMemoryError,
    rex.RpcError,
    rex.AuthenticationError,
)
#: Words in an actor's death notice that blame the machine (memory, node), not the code it ran.
_MACHINE_DEATH = re.compile(r"OOM|out of memory|low on memory|node .* (died|dead)|preempted|never ran", re.I)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^[^\n]*?\s?\(pid=[^)\n]*\)[ \t]*", re.M)  # "ray::Actor.method() (pid=.., ip=..)"
_FILE_LINE = re.compile(r'File "([^"]+)", line \d+')
_STDLIB = str(Path(sysconfig.get_paths()["stdlib"]).resolve())
REASON_LIMIT = 200


def root_cause(exc: BaseException) -> BaseException:
    """The implementation's own exception inside Ray's wrappers (``RayTaskError.cause``)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None) if isinstance(exc, rex.RayTaskError) else None
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its Ray causes and its ``__cause__``/``__context__`` chain."""
    out: list[BaseException] = []
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        stack += [getattr(e, "cause", None) if isinstance(e, rex.RayTaskError) else None, e.__cause__, e.__context__]
    return [e for e in out if isinstance(e, BaseException)]


def _files(exc: BaseException) -> list[str]:
    """Source files of the frames that raised ``exc``, outermost first (remote tracebacks included)."""
    files = [f.filename for f in tb.extract_tb(exc.__traceback__)] if exc.__traceback__ else []
    files += _FILE_LINE.findall(_remote_traceback(exc) or "")
    return files


def _remote_traceback(exc: BaseException) -> str | None:
    """The traceback text of a Ray task error (the exception Ray re-raises keeps it only in its message)."""
    if not isinstance(exc, rex.RayTaskError):
        return None
    text = exc.__dict__.get("traceback_str")
    return text if isinstance(text, str) else str(exc)


def _neutral(path: str) -> bool:
    if path.startswith("<"):
        return True  # <frozen importlib._bootstrap>, <string>
    p = Path(path)
    if str(p.resolve()).startswith(_STDLIB) and "site-packages" not in p.parts:
        return True
    parts = p.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            return i + 1 < len(parts) and parts[i + 1].split(".")[0] in NEUTRAL_PACKAGES
    return False


def _infrastructure_file(path: str) -> bool:
    p = Path(path)
    return p.parent.name == "suites" and p.stem in INFRASTRUCTURE


def innermost_decisive(exc: BaseException) -> str | None:
    """The innermost source file of ``exc``'s traceback outside the neutral libraries, if any."""
    for path in reversed(_files(exc)):
        if not _neutral(path):
            return path
    return None


def classify(exc: BaseException) -> str:
    """``"error"`` when ``exc`` says the check could not run, else ``"fail"``."""
    chain = _chain(exc)
    if any(isinstance(e, InfrastructureError) for e in chain):
        return "error"
    if any(isinstance(e, RAY_INFRASTRUCTURE) for e in chain):
        return "error"
    for e in chain:
        if isinstance(e, rex.RayActorError) and _MACHINE_DEATH.search(str(e)):
            return "error"
    root = root_cause(exc)
    if isinstance(root, AssertionError):
        return "fail"
    decisive = innermost_decisive(root) or innermost_decisive(exc)
    if decisive is not None and _infrastructure_file(decisive):
        return "error"
    return "fail"


def clean(text: str) -> str:
    """``text`` without ANSI colour codes, Ray's ``ray::Actor.method() (pid=..)`` prefixes and repeated blanks."""
    text = _RAY_PREFIX.sub("", _ANSI.sub("", str(text)))
    return " ".join(text.split())


def _last_meaningful_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    # Ray's messages end with the remote exception's own "Type: message" line.
    return lines[-1] if lines else ""


def reason(exc: BaseException, limit: int = REASON_LIMIT) -> str:
    """One line naming the root exception's type and message (an assertion: its message), at most ``limit`` characters."""
    root = root_cause(exc)
    message = str(root)
    if isinstance(root, rex.RayActorError) and "creation task" in message:
        message = _last_meaningful_line(message)
    elif isinstance(root, rex.RayError) and "Traceback" in message:
        message = _last_meaningful_line(message)
    message = clean(message)
    if isinstance(root, AssertionError):
        text = message or "assertion failed"
    else:
        name = type(root).__name__
        if isinstance(root, rex.RayTaskError):  # a cause Ray could not keep: its name is in the text
            name = "RayTaskError"
        text = f"{name}: {message}" if message else name
    return text if len(text) <= limit else text[: limit - 1] + "…"


def full_traceback(exc: BaseException) -> str:
    """The local traceback followed by every remote one (what the JSON keeps)."""
    parts = ["".join(tb.format_exception(type(exc), exc, exc.__traceback__))]
    for e in _chain(exc):
        remote = _remote_traceback(e)
        if remote and _ANSI.sub("", remote) not in parts:
            parts.append(_ANSI.sub("", remote))
    return "\n".join(parts)
