"""The one door to the compiled extension mailfilter._core (built from
_core/_core.pyx; its API contract is _core/README.md).

There is no pure-Python fallback: the pure-Python twins of the matchers
(tests/support/oracles/) are test oracles, never a slow path a server could
run on without anyone noticing. If the extension is missing, the import fails
here with a one-line hint instead of a bare ModuleNotFoundError.
"""
try:
    from mailfilter import _core
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "mailfilter._core is not built: run `make build` "
        "(or `pip install -e .`) to compile _core/_core.pyx"
    ) from exc

core = _core
