"""A package's public names loaded on first use (PEP 562), so that importing one light submodule (the
Snakefile's parse imports dsmoe.config) does not import torch through the package's __init__."""

import importlib


def lazy_exports(namespace, public):
    """`(__getattr__, __dir__)` for the package whose globals are `namespace`; `public` maps each name to
    the submodule that defines it."""
    package = namespace["__name__"]

    def __getattr__(name):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{public[name]}", package), name)
        namespace[name] = value  # loaded once; `dsmoe.convert` the function, not the submodule its import bound
        return value

    def __dir__():
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
