"""The house's import rules (scripts/check_layers.py): no loops, node/ never imports coordinator/, and each
room imports only the rooms below it. A breach fails here with the offending import named."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_layers.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_loops_and_layers_kept() -> None:
    assert _checker().breaches() == []


def test_the_checker_sees_a_loop_and_an_upward_import() -> None:
    """The check can fail: a loop and an import against the layers are both reported."""
    check = _checker()
    assert check.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert check.rank("edgeshard.node", "service") < check.rank("edgeshard.node", "lowbit")
    known = {"edgeshard.node.lowbit.layers", "edgeshard.node.service.ring"}
    src = Path(__file__).with_name("_layers_probe.py")
    src.write_text("from edgeshard.node.service.ring import RingNode\n")
    try:
        assert check.imports("edgeshard.node.lowbit.layers", src, known) == {"edgeshard.node.service.ring"}
    finally:
        src.unlink()
