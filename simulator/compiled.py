"""The simulator's hot modules (the part models, the bin's physics, the simulated device) compiled by
Cython from their own source, the same code: ~25-30 % less CPU for a city-sized
`binlink sim --report` (docs/simulator.md). Beside the source, declaration files (board.pxd,
esp32.pxd, cell.pxd, wifi.pxd) give the Board's, the chip's and the cell's hottest attributes fixed
slots; Python never reads them. The firmware, the MicroPython stand-ins and the gateway always run
as source.

A build is kept under the module's name and the digest of its source and the declarations beside
it, so a module runs compiled only from a build of exactly what is beside it: edit either and it
runs as source until built again. `binlink sim --compile` builds what is missing (`make` runs it
before the tests, the benches and the demo); without Cython or a C compiler everything runs as
source, as it does with BINLINK_SIM_SOURCE=1 in the environment (tests/test_sim_compiled.py runs a
district both ways and compares every frame and figure)."""
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

MODULES = ("binlink.sim.parts.board", "binlink.sim.parts.cell", "binlink.sim.parts.e22", "binlink.sim.parts.esp32",
           "binlink.sim.parts.lora", "binlink.sim.parts.rylr998", "binlink.sim.parts.sensors", "binlink.sim.parts.wifi",
           "binlink.sim.physics", "binlink.sim.device")
SOURCE_ONLY_ENV = "BINLINK_SIM_SOURCE"
# beside the interpreter that built them: in the virtual environment, gone with it
BUILD_DIR = os.environ.get("BINLINK_SIM_BUILD_DIR") or os.path.join(sys.prefix, "binlink-compiled")
_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def _source(name, path):
    """The module's source file in the package path `path` (None: no .py file there)."""
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _declarations(source):
    """The Cython declaration files beside a source (board.pxd, wifi.pxd: a module's .pxd and the
    ones it cimports shape its build as much as its source does)."""
    folder = os.path.dirname(source)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pxd"))


def build_path(name, source):
    """Where the build of `source` as it is now is kept: its name and the digest of the source and
    the declarations beside it."""
    h = hashlib.sha256()
    for path in [source] + _declarations(source):
        with open(path, "rb") as f:
            h.update(f.read())
    return os.path.join(BUILD_DIR, "%s-%s%s" % (name, h.hexdigest()[:16], _SUFFIX))


class _Finder:
    """On sys.meta_path: MODULES from their build when there is one for their source, else nothing
    (the usual finders import the source)."""

    def find_spec(self, name, path=None, target=None):
        if name not in MODULES or os.environ.get(SOURCE_ONLY_ENV):
            return None
        source = _source(name, path)
        built = build_path(name, source) if source else None
        if built is None or not os.path.exists(built):
            return None
        return importlib.util.spec_from_file_location(name, built, loader=importlib.machinery.ExtensionFileLoader(name, built))


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def active():
    """The MODULES imported compiled so far (their names)."""
    return [n for n in MODULES if n in sys.modules and not (sys.modules[n].__file__ or "").endswith(".py")]


def missing():
    """(name, source) of the MODULES with no build of their source."""
    import binlink.sim.parts  # noqa: F401 - the parents, for their path

    found = [(n, _source(n, sys.modules[n.rpartition(".")[0]].__path__)) for n in MODULES]
    return [(n, s) for n, s in found if s and not os.path.exists(build_path(n, s))]


def build(log=print):
    """Builds the missing MODULES (Cython, in a scratch tree that mirrors the package's names, on
    every core); returns how many are compiled, or None when they cannot be (said in log)."""
    todo = missing()
    if not todo:
        return len(MODULES)
    try:
        import Cython  # noqa: F401
    except ImportError:
        log("compiled part models: Cython is not installed (pip install 'binlink[sim]'); running as source")
        return None
    try:
        os.makedirs(BUILD_DIR, exist_ok=True)
    except OSError as e:
        return _cannot_keep(log, e)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, source in todo:
            parts = name.split(".")
            for k in range(1, len(parts)):  # __init__.py files: Cython names the module by its package
                pkg = os.path.join(tmp, *parts[:k])
                os.makedirs(pkg, exist_ok=True)
                open(os.path.join(pkg, "__init__.py"), "a").close()
            files.append(os.path.join(*parts) + ".py")
            shutil.copyfile(source, os.path.join(tmp, files[-1]))
            for pxd in _declarations(source):
                shutil.copyfile(pxd, os.path.join(tmp, *parts[:-1], os.path.basename(pxd)))
        r = subprocess.run([sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", "-q", "-j", str(os.cpu_count() or 1)] + files,
                           cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).strip().splitlines()
            log("compiled part models: the build failed, running as source: %s (it needs a C compiler and "
                "Python's headers: apt-get install gcc python3-dev)" % (lines[-1] if lines else "no output"))
            return None
        try:
            for (name, _), f in zip(todo, files):
                dest = build_path(name, os.path.join(tmp, f))  # the digest of the very bytes compiled
                for old in os.listdir(BUILD_DIR):  # the builds of an earlier source
                    if old.startswith(name + "-"):
                        os.remove(os.path.join(BUILD_DIR, old))
                shutil.copyfile(os.path.join(tmp, f[:-3] + _SUFFIX), dest + ".part")
                os.replace(dest + ".part", dest)
        except OSError as e:
            return _cannot_keep(log, e)
    return len(MODULES) - len(missing())


def _cannot_keep(log, e):
    log("compiled part models: cannot keep builds in %s (%s); running as source" % (BUILD_DIR, e.strerror or e))


def status():
    """One line: whether a run here has the compiled part models."""
    n = len(MODULES) - len(missing())
    if os.environ.get(SOURCE_ONLY_ENV):
        return "part models run as source (%s is set)" % SOURCE_ONLY_ENV
    if n == len(MODULES):
        return "part models compiled (Cython)"
    return "part models run as source (%d of %d compiled; `binlink sim --compile` builds them: ~25 %% less CPU)" % (n, len(MODULES))


def main():
    n = len(MODULES) - len(missing())
    if n == len(MODULES):
        print("==> simulator part models: all %d compiled (%s)" % (n, BUILD_DIR))
        return 0
    print("==> compiling the simulator's part models with Cython (%d of %d; once per change of their source)" % (
        len(MODULES) - n, len(MODULES)), flush=True)
    done = build()
    if done is not None:
        print("==> simulator part models: %d of %d compiled (%s)" % (done, len(MODULES), BUILD_DIR))
    return 0  # running as source is slower, never wrong

