"""The package's shape (docs/design.md): models are modules only, parallel/ knows nothing of training, no import
cycle between packages, test-only code stays out of the installed package, and every registered task declares the
task interface."""

from __future__ import annotations

import ast
import inspect
import itertools
from pathlib import Path

import pytest

from configs import default, mllm, tts
from latent_lm.latents import LatentNormalization
from latent_lm.training.tasks import GENERATOR_TASKS, GeneratorTask, make_generator_task

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("latent_lm", "data_pipelines")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _unit(module: str) -> str | None:
    """The layering unit of a module: a subpackage of latent_lm (latent_lm.models), a top-level module of latent_lm
    (latent_lm.sampling), or data_pipelines."""
    parts = module.split(".")
    if parts[0] == "data_pipelines":
        return "data_pipelines"
    if parts[0] != "latent_lm" or len(parts) == 1:
        return None
    return ".".join(parts[:2])


GRAPH: dict[str, set[str]] = {}
FILE_IMPORTS: dict[str, set[str]] = {}
for _pkg in PACKAGES:
    for _path in sorted((REPO / _pkg).rglob("*.py")):
        _name = _module_name(_path)
        FILE_IMPORTS[_name] = _imports(_path)
        _src = _unit(_name)
        for _imported in FILE_IMPORTS[_name]:
            _dst = _unit(_imported)
            if _src and _dst and _dst != _src:
                GRAPH.setdefault(_src, set()).add(_dst)


@pytest.mark.parametrize("layer,forbidden", [
    ("latent_lm.models", ("latent_lm.training", "data_pipelines", "latent_lm.experiment")),
    ("latent_lm.parallel", ("latent_lm.training", "latent_lm.planning", "latent_lm.experiment")),
    ("latent_lm.diffusion", ("latent_lm.models", "latent_lm.training", "data_pipelines")),
    ("latent_lm.latents", ("latent_lm.models", "latent_lm.training", "data_pipelines")),
])
def test_lower_layers_import_nothing_above_them(layer, forbidden):
    bad = sorted((name, imported) for name, imports in FILE_IMPORTS.items()
                 if name == layer or name.startswith(layer + ".")
                 for imported in imports if imported.startswith(forbidden))
    assert not bad, bad


def test_no_import_cycle_between_packages():
    def reaches(src, dst, seen=()):
        return any(n == dst or (n not in seen and reaches(n, dst, (*seen, n))) for n in GRAPH.get(src, ()))

    cycles = [(a, b) for a, b in itertools.combinations(sorted(GRAPH), 2) if reaches(a, b) and reaches(b, a)]
    assert not cycles, cycles


def test_the_graph_sees_the_imports():
    """The checks above read real edges (guards against a parser that finds nothing)."""
    assert "latent_lm.models" in GRAPH["latent_lm.training"]
    assert "latent_lm.storage" in GRAPH["data_pipelines"]


def test_test_only_samplers_are_not_in_the_package():
    names = {n for imports in FILE_IMPORTS.values() for n in imports}
    sources = "".join(path.read_text() for pkg in PACKAGES for path in (REPO / pkg).rglob("*.py"))
    for name in ("make_reference_sampler", "ddpm_sample"):
        assert f"def {name}(" not in sources and not any(n.endswith(f".{name}") for n in names), name


@pytest.mark.parametrize("arch", sorted(GENERATOR_TASKS))
def test_registered_tasks_declare_the_generator_interface(arch):
    """Built from the first shipped config that is valid for the kind (image-only, multimodal or speech)."""
    candidates = []
    for config in (default.get_config(), mllm.get_config(), mllm.get_config("arm=vq"), tts.get_config()):
        config.model.arch = arch
        candidates.append(config)
    config = next(c for c in candidates if all(ok for ok, _ in GENERATOR_TASKS[arch].config_checks(c)))
    task = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    assert isinstance(task, GeneratorTask), arch
    assert "train" in inspect.signature(task.loss).parameters
