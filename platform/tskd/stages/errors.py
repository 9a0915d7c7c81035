"""tskd's own errors raised inside Ray workers, found again on the driver.

Ray wraps an exception raised in a worker: Train V2's ``TrainingFailedError`` subclasses
(``WorkerGroupError.worker_failures`` maps each rank to a ``UserExceptionWithTraceback`` whose
``_base_exc`` is the original; ``ControllerError.controller_failure``), ``RayTaskError`` (``cause``;
its ``as_instanceof_cause()`` class also subclasses the original type but its text is the whole
remote traceback), and ``fit_torch_trainer``'s ``RuntimeError`` chains them (``__cause__``).
:func:`own_error` walks all of these and returns the original tskd error (a
:class:`tskd.config.TskdError` or a :class:`tskd.data.format.DatasetError`), so that
:func:`tskd.pipeline.run_pipeline` can raise it as a :class:`StageFailed` with a short message and
the traceback written to ``runs/<experiment>/<stage>.error.log``.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Iterator

from tskd.config import TskdError
from tskd.data.format import DatasetError

__all__ = ["StageFailed", "error_log_path", "own_error", "write_error_log"]


def error_log_path(run_dir: Path, stage: str) -> Path:
    """Where a failed stage's traceback goes: beside the run's view of its stages, never inside
    a store entry."""
    return Path(run_dir) / f"{stage}.error.log"
OWN_ERRORS: tuple[type[BaseException], ...] = (TskdError, DatasetError)
"""Exception types that are tskd's verdict on the user's input (not a bug)."""


class StageFailed(TskdError):
    """A stage failed because of bad input (``cause``); its traceback is in ``log_path``."""

    def __init__(self, stage: str, cause: BaseException, log_path: Path) -> None:
        super().__init__(f"{cause} (stage {stage}; traceback: {log_path})")
        self.stage = stage
        self.cause = cause
        self.log_path = log_path

    def __reduce__(self):  # picklable with its three arguments
        return (self.__class__, (self.stage, self.cause, self.log_path))


def _children(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    for attr in ("_base_exc", "cause", "controller_failure", "__cause__", "__context__"):
        child = getattr(exc, attr, None)
        if isinstance(child, BaseException):
            out.append(child)
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        out += [f for _, f in sorted(failures.items()) if isinstance(f, BaseException)]
    return out


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


def _walk(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything in its wrapping and cause chain, breadth first, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += _children(e)


def own_error(exc: BaseException) -> BaseException | None:
    """The first tskd error (``OWN_ERRORS``, not a Ray wrapper class) in ``exc``'s wrapping and
    cause chain, breadth first; ``exc`` itself if it is one; None if there is none."""
    return next((e for e in _walk(exc) if isinstance(e, OWN_ERRORS) and not _is_ray_wrapper(e)),
                None)


def write_error_log(path: Path, exc: BaseException) -> Path:
    """Write ``exc``'s full traceback (chained causes included) and the traceback text of every
    worker failure Ray captured to ``path``; return ``path``."""
    parts = ["".join(traceback.format_exception(exc))]
    for e in _walk(exc):
        text = getattr(e, "_traceback_str", None)
        if isinstance(text, str):
            parts.append(f"--- worker traceback ({type(getattr(e, '_base_exc', e)).__name__}) ---\n"
                         + text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
