"""The package as a user gets it: the sdist and the wheel build, hold what they should, and the
wheel installs and imports; importing triton_xent and the first call of each public op, on
both backends, raise no warning; the first compile of a kernel raises none either."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import triton_xent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_FILES = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d, _, files in os.walk(os.path.join(ROOT, "triton_xent"))
    for f in files if f.endswith(".py"))


def run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel that `python -m build` makes (the wheel from the sdist), built
    from a copy of the source so that the checkout is left as it was. Without build isolation:
    the test extras hold the backend (setuptools), and a fresh build environment would cost
    CI about 20 s of installing it."""
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", ".wheels", ".pytest_cache"))
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
         str(src)])
    files = sorted(os.listdir(tmp / "dist"))
    assert len(files) == 2, files
    return {name.rsplit(".", 1)[-1]: tmp / "dist" / name for name in files}


def test_sdist_holds_the_package_license_readme_and_changelog(dist):
    version = triton_xent.__version__
    assert dist["gz"].name == f"triton_xent-{version}.tar.gz"
    with tarfile.open(dist["gz"]) as tar:
        top = f"triton_xent-{version}/"
        names = {n.removeprefix(top) for n in tar.getnames()}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", *PACKAGE_FILES} <= names
    assert not {n for n in names if "__pycache__" in n or n.endswith(".pyc")}


def test_wheel_installs_and_imports_with_its_license_and_version(dist, tmp_path):
    version = triton_xent.__version__
    with zipfile.ZipFile(dist["whl"]) as whl:
        names = set(whl.namelist())
        info = f"triton_xent-{version}.dist-info/"
        metadata = whl.read(info + "METADATA").decode()
    assert set(PACKAGE_FILES) <= names and info + "licenses/LICENSE" in names
    assert f"\nVersion: {version}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata
    # Installed alone into a folder (torch and triton come from this environment).
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(target), str(dist["whl"])])
    env = dict(os.environ, PYTHONPATH=str(target))
    out = run([sys.executable, "-c", "import importlib.metadata as m, triton_xent; "
               "print(triton_xent.__file__); print(triton_xent.__version__, "
               "m.version('triton_xent'))"], env=env, cwd=tmp_path)
    where, versions = out.stdout.splitlines()
    assert where.startswith(str(target)) and versions == f"{version} {version}"


# Every public op once on a tiny input (forward and backward), on each backend, with every
# warning an error. backend="triton" runs the kernels through the interpreter on a CPU.
FIRST_CALLS = """
import warnings
warnings.simplefilter("error")
# Triton 3.6 and older's interpreter (not the compiled kernels) warns about its own loop
# bounds under NumPy 1.25 and newer (conftest._interpreter_problem): Triton's, not ours.
warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0 to a scalar",
                        DeprecationWarning)
# The interpreter evaluates the padded lanes of a tile with NumPy (-inf - -inf, log 0), which
# warns where a GPU computes the same IEEE values silently and the kernel discards them
# (pyproject.toml filters the same for the suite).
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
import torch
import triton_xent
backends = ["torch"] + (["triton"] if triton_xent.triton_available() else [])
for backend in backends:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, generator=g, requires_grad=True)
    t = torch.randint(0, 10, (4,), generator=g)
    h = torch.randn(4, 8, generator=g, requires_grad=True)
    w = torch.randn(10, 8, generator=g, requires_grad=True)
    teacher, th, tw = torch.randn(4, 10), torch.randn(4, 6), torch.randn(10, 6)
    losses = [
        triton_xent.cross_entropy(x, t, backend=backend),
        triton_xent.CrossEntropyLoss(backend=backend)(x, t),
        triton_xent.linear_cross_entropy(h, w, t, backend=backend),
        triton_xent.LinearCrossEntropyLoss(backend=backend)(h, w, t),
        triton_xent.distillation_loss(x, teacher, t, backend=backend),
        triton_xent.DistillationLoss(divergence="jsd", backend=backend)(x, teacher),
        triton_xent.linear_distillation_loss(h, w, th, tw, t, backend=backend),
        triton_xent.LinearDistillationLoss(divergence="reverse_kl", backend=backend)(
            h, w, th, tw),
    ]
    sum(losses).backward()
print(" ".join(backends))
"""


def test_import_and_first_call_of_each_op_warn_nothing():
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    out = run([sys.executable, "-c", FIRST_CALLS], env=env, cwd=ROOT)
    assert out.stderr == "" and out.stdout.split() == (
        ["torch", "triton"] if triton_xent.triton_available() else ["torch"])


def test_first_compile_of_a_kernel_warns_nothing():
    # What a GPU does at the first call: Triton's compiler, here offline for sm_90 through the
    # audit. Triton warns once a process, so this is one launch; that every launch names what
    # Triton would otherwise warn about (floating-point fusion) is test_compile_audit.py's.
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    run([sys.executable, "-W", "error", os.path.join(ROOT, "bench", "compile_audit.py"),
         "--only", "whole_V4096_bf16"], env=env, cwd=ROOT)


def _imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports, lazy imports (inside functions) included:
    `from . import x`, `from .x import y`, `from .. import x`, `import triton_xent.x`. A name
    imported from a package is its submodule where there is one, else the package."""
    import ast

    def module_of(path):
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module_of(os.path.join(ROOT, p)): os.path.join(ROOT, p) for p in PACKAGE_FILES}
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        edges = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "triton_xent":
                    origin = node.module
                else:
                    continue
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    edges.add(sub if sub in modules else origin)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
        graph[name] = edges - {name}
    return graph


def test_the_package_imports_form_no_cycle():
    # The modules form a DAG, lazy imports included: what both kernel families share lives
    # below both (kernels/tiles.py), and distill.py builds on distributed.py, never the
    # reverse. A package's __init__ is left out: importing a submodule runs it first anyway.
    graph = {m: {e for e in edges if not m.startswith(e + ".") and e != "triton_xent"}
             for m, edges in _imports().items()}
    assert "triton_xent.kernels.tiles" in graph["triton_xent.kernels.xent"]
    assert "triton_xent.distributed" in graph["triton_xent.distill"]
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(module, path):
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not graph["triton_xent.kernels.xent"] & {"triton_xent.kernels.distill"}
    assert not graph["triton_xent.kernels.distill"] & {"triton_xent.kernels.xent"}
