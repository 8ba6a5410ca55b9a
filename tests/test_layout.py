"""The house's rules, checked on the source: imports point one way and never in a cycle,
kernels/ sees only the format layer, modules stay readable, and our top-level kernels/
folder never shadows the PyPI `kernels` package that transformers imports."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "smollm3_triton"
PKG = "smollm3_triton"

# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS = [
    ("errors",),
    ("gguf",),
    ("kernels", "_cpu"),          # _cpu: the compiled CPU kernels (csrc/cpu/, built by setup.py)
    ("config", "weights", "tokenizer", "chat", "chat_parser", "sampling_params", "hub", "model", "backends"),
    ("engine", "vision"),
    ("runtime", "tools"),         # Runtime.perplexity delegates to tools/; tools/bench loads a Runtime
    ("entrypoints",),
    ("cli", "__init__", "__main__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# Modules allowed past MAX_LINES, each with the reason it stays whole.
MAX_LINES = 450
LONG_MODULES: dict[str, str] = {}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = [PKG] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_files() -> list[Path]:
    files = [p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts]
    return sorted(files + list((ROOT / "kernels").glob("*.py")))


def imports_of(path: Path) -> set[str]:
    """Every smollm3_triton module this file imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PKG)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith(PKG):
                # `from . import hub`: the names may be modules themselves
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    found.add(sub if _is_module(sub) else target)
    found.discard(name)
    return found


# Modules compiled from C at install time (no .py to find): name -> their sources.
COMPILED = {f"{PKG}._cpu": ROOT / "csrc" / "cpu"}


def _is_module(name: str) -> bool:
    if name in COMPILED:
        return COMPILED[name].is_dir()
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file() or \
        (rel.parts and rel.parts[0] == "kernels" and (ROOT / rel).with_suffix(".py").is_file())


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in package_files()}


def layer(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1] if len(parts) > 1 else "__init__"]


def test_no_import_cycle():
    g = graph()
    # A package's __init__ importing its own submodules is not a cycle of the code's logic.
    edges = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".") or m == PKG}
             for m, ts in g.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_imports_point_down():
    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})"
              for m, ts in graph().items() for t in ts if m != PKG and layer(t) > layer(m)]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_kernels_see_only_the_format_layer():
    for path in (ROOT / "kernels").glob("*.py"):
        for t in imports_of(path):
            assert t.startswith((f"{PKG}.gguf", f"{PKG}.errors", f"{PKG}.kernels", f"{PKG}._cpu")), \
                f"{path.name} imports {t}"


def test_modules_stay_readable():
    long = {module_name(p): n for p in package_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    unexplained = {m: n for m, n in long.items() if m not in LONG_MODULES}
    assert not unexplained, f"modules over {MAX_LINES} lines: {unexplained}"
    stale = set(LONG_MODULES) - set(long)
    assert not stale, f"no longer over {MAX_LINES} lines, drop them from LONG_MODULES: {stale}"


def test_top_level_kernels_folder_never_shadows_the_pypi_package():
    """From the repo root (where `python -m pytest` puts the root first on sys.path),
    `import kernels` is PyPI's, transformers' SmolVLM classes import, and ours is
    smollm3_triton.kernels."""
    if importlib.util.find_spec("kernels") is None:
        pytest.fail("the PyPI package `kernels` is not installed (the test extra declares it)")
    code = ("import kernels, smollm3_triton.kernels.qmatmul as q\n"
            "from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration\n"
            "print(kernels.__file__); print(q.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pypi, ours = out.stdout.split()
    assert not Path(pypi).resolve().is_relative_to(ROOT), pypi
    assert Path(ours).resolve().parent == (ROOT / "kernels").resolve()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_no_undefined_or_unused_names():
    """pyflakes' checks (ruff's F rules) over the whole tree: a name lost in a merge is a
    NameError only on the path that reaches it, which a test run may not take."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--output-format", "concise",
                          str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
