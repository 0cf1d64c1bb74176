"""service/ is layered by concern and its imports point one way (docs/architecture.md, "Folders").

    api ──> dicom_node ──> inference ──> dicom ──> shared (settings, errors, metrics, allocator)
     │          │                          ^
     └──────────┴──> viewer_outputs ───────┘

(api also imports inference and dicom directly; dicom_node is the DICOM ingress, started from api's lifespan.)

The launchers (`service/__main__.py`, `service/multiworker.py`) sit above everything and nothing imports them.
The check reads the source (AST), so an import inside a function or under TYPE_CHECKING counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"

# viewer_outputs/codes.py is the one table of coded concepts: the SR codes findings and diseases with it, and the
# JSON answer (built in inference) carries the same codes, so it is shared (it imports nothing from service/).
SHARED = {"service.settings", "service.errors", "service.metrics", "service.allocator", "service.viewer_outputs.codes"}
LAUNCHERS = {"service.__main__", "service.multiworker", "service.triton_repository", "service.dicom_node.__main__"}
# Layer -> the layers its modules may import (besides their own and the shared modules).
ALLOWED = {
    "shared": set(),
    "dicom": set(),
    "viewer_outputs": {"dicom"},
    "inference": {"dicom"},
    "dicom_node": {"dicom", "inference", "viewer_outputs"},
    "api": {"dicom", "inference", "viewer_outputs", "dicom_node"},
    "launcher": {"dicom", "inference", "viewer_outputs", "dicom_node", "api", "launcher"},
}


def layer_of(module: str) -> str | None:
    """The layer of a `service...` module name; None for the package itself (service/__init__.py)."""
    if module in SHARED:
        return "shared"
    if module in LAUNCHERS:
        return "launcher"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return None


def module_name(path: Path) -> str:
    relative = path.relative_to(SERVICE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every `service...` module that `source` imports, relative imports resolved."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from service import runtime` imports the module service.runtime, not a name of the package.
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return {name for name in found if name == "service" or name.startswith("service.")}


def back_edges(module: str, imports: set[str], known: set[str]) -> list[str]:
    """The imports of `module` that point against the layering, as 'importer -> imported (why)'.

    `known` are the modules that exist: `from service.x import y` also yields the candidate `service.x.y`,
    which only counts when y is a module.
    """
    problems = []
    own = layer_of(module)
    for target in sorted(imports & known):
        other = layer_of(target)
        if other == "launcher" and own != "launcher":
            problems.append(f"{module} -> {target} (nothing imports the launchers)")
        elif other not in (None, own, "shared") and other not in ALLOWED.get(own, set()):
            problems.append(f"{module} -> {target} ({own} may not import {other})")
    return problems


def service_modules() -> dict[str, Path]:
    return {module_name(path): path for path in SERVICE.rglob("*.py")}


def test_every_service_module_has_a_layer():
    """Each module of service/ belongs to a layer (a new top-level module must be placed deliberately)."""
    unplaced = [name for name in service_modules() if name != "service" and layer_of(name) is None]
    assert not unplaced, f"not in any layer: {unplaced}; put them in a concern's package or in SHARED"


def test_imports_point_one_way():
    """api -> inference/dicom/viewer_outputs, viewer_outputs and inference -> dicom, everything -> shared; never
    back."""
    modules = service_modules()
    problems = []
    for name, path in modules.items():
        imports = imported_modules(path.read_text(), name, path.name == "__init__.py")
        problems += back_edges(name, imports, set(modules))
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_check_catches_a_back_edge():
    """A module of the decode stage importing the API (absolute or relative), or the API importing a launcher,
    is reported: the check above can fail."""
    known = set(service_modules())
    assert "service.api.app" in known and "service.dicom.decode" in known
    absolute = imported_modules("from service.api.app import create_app\n", "service.dicom.decode", False)
    relative = imported_modules("def f():\n    from ..inference import state\n", "service.dicom.decode", False)
    launcher = imported_modules("import service.multiworker\n", "service.api.app", False)
    assert back_edges("service.dicom.decode", absolute, known) == [
        "service.dicom.decode -> service.api.app (dicom may not import api)"
    ]
    assert back_edges("service.dicom.decode", relative, known) == [
        "service.dicom.decode -> service.inference (dicom may not import inference)",
        "service.dicom.decode -> service.inference.state (dicom may not import inference)",
    ]
    assert back_edges("service.api.app", launcher, known) == [
        "service.api.app -> service.multiworker (nothing imports the launchers)"
    ]
    assert (
        back_edges(
            "service.api.app", imported_modules("from service.dicom import decode\n", "service.api.app", False), known
        )
        == []
    )
