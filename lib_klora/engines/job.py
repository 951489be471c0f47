"""Host-free helpers around the WebUI's processing object that every host adapter shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def on_sampling_failure(p: Any, cleanup: Callable[[BaseException], None]) -> None:
    """Run `cleanup` the moment `p.sample` raises, then let the exception go on.

    The WebUI skips scripts' `postprocess` when sampling raises, and a next job's `before_process` would
    only clean up later; wrapping the processing object's own `sample` covers every exit of sampling.
    An interrupt is not a failure here: samplers return normally after one.
    """
    original = p.sample

    def sample(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except BaseException as exc:
            cleanup(exc)
            raise

    p.sample = sample
