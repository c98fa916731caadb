"""JIT-build the C++ CPU kernels in csrc/ with torch.utils.cpp_extension (ninja), once per process.

The build is cached in torch's extensions directory (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), so only the first use on a machine compiles. Without a working compiler
`load_cpp` warns once and returns None, and the dispatchers fall back to the torch reference.
"""

import functools
import hashlib
import importlib.resources
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

# -fopenmp makes at::parallel_for (inline in the ATen headers) run in parallel; no -march=native, so a
# cached build also runs on another machine (kernels that want AVX2 use per-function target clones).
_FLAGS = ["-O3", "-fopenmp"]


@functools.cache
def load_cpp(name: str) -> ModuleType | None:
    """Build (or load from cache) csrc/<name>.cpp as the extension module `mope_<name>`; None if it fails."""
    source = importlib.resources.files("mope.csrc") / f"{name}.cpp"
    if not source.is_file():
        raise FileNotFoundError(f"no C++ source for extension {name!r}: {source}")
    _put_ninja_on_path()
    from torch.utils.cpp_extension import load

    # torch rebuilds when a source or a flag changes, not a header: the headers' hash goes in as a flag
    headers = sorted(Path(str(source)).parent.glob("*.h"))
    digest = f"-DMOPE_HEADERS={hashlib.sha256(b''.join(h.read_bytes() for h in headers)).hexdigest()[:16]}"
    _announce_first_build(f"mope_{name}")
    errors = []
    for flags in ([*_FLAGS, digest], [f for f in _FLAGS if f != "-fopenmp"] + [digest]):
        try:
            return load(name=f"mope_{name}", sources=[str(source)], extra_cflags=flags,
                        extra_ldflags=[f for f in flags if f == "-fopenmp"], verbose=False)
        except Exception as error:  # a compiler error, a missing compiler or ninja: all mean "no C++ here"
            errors.append(f"{' '.join(flags)}: {error}")
    warnings.warn(f"C++ kernel {name!r} could not be built; using the torch backend instead.\n"
                  + "\n".join(errors), RuntimeWarning, stacklevel=2)
    return None


def _announce_first_build(module: str) -> None:
    """One line on stderr when nothing is built yet: the compile takes about a minute, silently otherwise."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        built = any(Path(_get_build_directory(module, verbose=False)).glob(f"{module}*.so"))
    except Exception:  # a private torch helper: if it moves, say nothing rather than fail
        return
    if not built:
        print(f"mope: compiling the C++ kernel {module} (first use on this machine, about a minute; "
              "cached afterwards)", file=sys.stderr, flush=True)


def _put_ninja_on_path() -> None:
    """torch looks ninja up on PATH; a venv that was not activated has it only next to its python."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
