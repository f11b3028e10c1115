"""The executors of ``quantmill run``: who runs a plan's stages. One record each, registered by the imports below.

``local`` (the default) runs them in this process; ``ray`` on a running Ray cluster (the optional extra
``quantmill[ray]``). Importing this package imports neither torch nor Ray.
"""
from __future__ import annotations

from quantmill.pipeline.executors import local, ray
from quantmill.pipeline.executors.base import Executor, ExecutorOptions

DEFAULT = local.EXECUTOR.name
EXECUTORS: dict[str, Executor] = {}
for _record in (local.EXECUTOR, ray.EXECUTOR):
    if _record.name in EXECUTORS:
        raise ValueError(f"executor {_record.name!r} is registered twice")
    EXECUTORS[_record.name] = _record

__all__ = ["DEFAULT", "EXECUTORS", "Executor", "ExecutorOptions"]
