"""The shape of the code: what a maintainer relies on when adding a flow, score, support
or method (one new class, no edit to `solve`)."""

import ast
import pathlib

import replicax as rx


PACKAGE = pathlib.Path(rx.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def _concrete_classes():
    """Concrete flow, score and support classes, with the module that defines each."""
    out = {}
    for base in (rx.AbstractFlow, rx.AbstractScore, rx.AbstractSupport, rx.AbstractMethod):
        stack = [base]
        while stack:
            cls = stack.pop()
            stack.extend(cls.__subclasses__())
            if not cls.__name__.startswith("Abstract") and cls.__module__.startswith(
                "replicax"
            ):
                out[cls.__name__] = cls.__module__
    return out


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_isinstance_on_concrete_classes_outside_their_module():
    concrete = _concrete_classes()
    assert {"Replicator", "Logits", "TopP", "Exact"} <= set(concrete)
    offences = []
    for path in MODULES:
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
                "isinstance", "issubclass"
            )):
                continue
            for name in ast.walk(node.args[1]):
                ident = getattr(name, "id", None) or getattr(name, "attr", None)
                if ident in concrete and concrete[ident] != module:
                    offences.append(f"{module}: isinstance(..., {ident})")
    assert not offences, offences


def test_no_private_imports_across_modules():
    """A module may import another's public names; underscore names stay in their
    module (the internal modules `_rows`, `_misc` share theirs without underscores)."""
    offences = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for alias in node.names:
                    if alias.name.startswith("_"):
                        offences.append(f"{_module_name(path)}: {alias.name}")
    assert not offences, offences


def test_solve_is_thin():
    lines = (PACKAGE / "_solve.py").read_text().splitlines()
    assert len(lines) < 250


def test_every_imported_package_is_declared():
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
                for d in project["dependencies"]}
    optional = {
        d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
        for extra in project["optional-dependencies"].values()
        for d in extra
    }
    imported = set()
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    stdlib = __import__("sys").stdlib_module_names
    third_party = {m for m in imported if m not in stdlib and m != "replicax"}
    missing = third_party - declared - optional
    assert not missing, f"imported but not declared: {missing}"
    unused = declared - third_party - {"jaxtyping"}
    assert not unused, f"declared but never imported: {unused}"
