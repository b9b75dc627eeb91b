"""The walls of the design, read from the source: who may import whom.

Every import counts, including the lazy ones inside functions: a lazy import still ties two
modules together (it only moves the cost). The graph is built with `ast`, so nothing is imported.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# repository folder -> the package name it installs as (setup.py's package_dir)
PACKAGES = {"tokensynth_jax": "tokensynth_jax", "data_prep": "tokensynth_prep", "configs": "tokensynth_jax.configs"}
PREP_GATE = "tokensynth_jax.cli.prep"  # the one module of tokensynth_jax that may import the prep job


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the installed packages."""
    out = {}
    for folder, package in PACKAGES.items():
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(root, name), os.path.join(REPO, folder))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([package, *rel])] = os.path.join(root, name)
    return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """Modules of ours (and top-level third-party names) that `module` imports anywhere in its file."""
    tree = ast.parse(open(path).read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            submodules = {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
            found.update(submodules or {target})  # `from pkg import module` imports the module, not pkg's names
    # a name of ours resolves to the longest module that exists; third-party names keep their top level
    resolved = set()
    for name in found:
        while name and name not in known and "." in name and name.split(".")[0] in ("tokensynth_jax", "tokensynth_prep"):
            name = name.rsplit(".", 1)[0]
        resolved.add(name if name in known else name.split(".")[0])
    return resolved - {module}


def _graph():
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_the_package_never_imports_the_prep_job_except_through_the_cli_gate():
    graph = _graph()
    offenders = sorted(m for m, deps in graph.items() if m.startswith("tokensynth_jax") and m != PREP_GATE
                       and not m.startswith("tokensynth_jax.configs")
                       and any(d == "tokensynth_prep" or d.startswith("tokensynth_prep.") or d == "data_prep"
                               for d in deps))
    assert offenders == []
    assert any(d.startswith("tokensynth_prep") for d in graph[PREP_GATE])


def test_no_import_cycles():
    graph = _graph()
    ours = {m: {d for d in deps if d in graph and not graph[m] is None} for m, deps in graph.items()}
    # a package's __init__ is a namespace here, not a module that pulls its children in
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(ours[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(ours):
        if m not in state:
            visit(m)
    assert cycles == []


def test_layers_of_the_design():
    graph = _graph()

    def deps_of(prefix):
        return {m: deps for m, deps in graph.items() if m == prefix or m.startswith(prefix + ".")}

    # Token layout, MIDI tokens and records: pure data code that uses nothing of ours but errors.
    for m, deps in deps_of("tokensynth_jax.tokens").items():
        ours = {d for d in deps if d.startswith("tokensynth_jax")}
        assert ours <= {"tokensynth_jax.errors", "tokensynth_jax.tokens"} | {d for d in ours if d.startswith("tokensynth_jax.tokens.")}, m
    # The model: layers, token layout, config, sharding helpers; no trainer, no torch, no CLI.
    allowed_model = ("tokensynth_jax.model", "tokensynth_jax.tokens", "tokensynth_jax.config", "tokensynth_jax.errors",
                     "tokensynth_jax.sharding")
    for m, deps in deps_of("tokensynth_jax.model").items():
        bad = {d for d in deps if d.startswith("tokensynth_jax") and not d.startswith(allowed_model)}
        assert not bad and not deps & {"torch", "transformers", "argparse"}, (m, bad)
    # Sampling uses the model and the token layout, never the trainer.
    for m in ("tokensynth_jax.inference.sampling", "tokensynth_jax.inference.export"):
        assert not {d for d in graph[m] if d.startswith("tokensynth_jax.training")}, m
    # torch and transformers live behind the audio front end and the converters.
    for m, deps in graph.items():
        if deps & {"torch", "transformers"}:
            assert m.startswith(("tokensynth_jax.audio", "tokensynth_jax.interop")), m
    # Only the command line parses flags.
    for m, deps in graph.items():
        if "argparse" in deps and not m.startswith("tokensynth_jax.inference.assets"):  # assets: standalone scripts
            assert m.startswith("tokensynth_jax.cli"), m
