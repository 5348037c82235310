"""The one door to the compiled extension mailfilter._core.

There is no pure-Python fallback (DESIGN.md): if the extension is missing the
import fails here with a one-line hint instead of a bare ModuleNotFoundError.
"""
try:
    from mailfilter import _core
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "mailfilter._core is not built: run `make build` "
        "(or `pip install -e .`) to compile _core/_core.pyx"
    ) from exc

core = _core
