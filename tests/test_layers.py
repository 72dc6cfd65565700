"""The layer contract names every room: a module added later and left out of it would be
unconstrained (`lint-imports`, run by `make test`, checks the imports of the rooms it names)."""
import tomllib

from support.store import PROJECT


def test_every_pipeline_module_is_in_exactly_one_layer():
    contract = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    listed = [name.strip() for layer in contract["layers"] for name in layer.split("|")]
    modules = sorted(f"pipeline.{path.stem}" for path in (PROJECT / "pipeline").glob("*.py")
                     if path.stem != "__init__")
    assert sorted(listed) == modules  # each once, none missing, none stale
