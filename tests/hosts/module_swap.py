"""Fake host modules in `sys.modules` for one test, and everything exactly as it was afterwards.

Both host fakes (A1111 in `fake_a1111_webui.py`, Forge/reForge in `fake_patcher_hosts.py`) import K-LoRA's
host glue against fake WebUI modules; the glue must be imported afresh each time and removed again, with the
`lib_klora.hosts` package attributes the import sets, so no test sees another test's fakes."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def swapped_modules(fakes: Mapping[str, ModuleType], host_modules: Sequence[str]) -> Iterator[None]:
    """Install `fakes`, drop `host_modules` (dotted names under lib_klora.hosts) so they import afresh; on
    exit restore every entry of sys.modules and every attribute of the hosts package touched."""
    import lib_klora.hosts as hosts_package

    saved = {name: sys.modules.get(name) for name in [*fakes, *host_modules]}
    attributes = [name.rsplit(".", 1)[1] for name in host_modules]
    saved_attributes = {name: getattr(hosts_package, name, None) for name in attributes}
    for name in host_modules:
        sys.modules.pop(name, None)
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in saved_attributes.items():
            if value is None:
                if hasattr(hosts_package, name):
                    delattr(hosts_package, name)
            else:
                setattr(hosts_package, name, value)
