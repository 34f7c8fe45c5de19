"""The wire protocol is named in one module: no other package module spells one of its keys."""

import ast
from pathlib import Path

import pytest

from collafuse_flwr import protocol as P

ROOT = Path(__file__).resolve().parent.parent
#: where the protocol is spoken: the package, the strategies and the example apps
SOURCES = [p for d in ("collafuse_flwr", "strategies", "examples") for p in sorted((ROOT / d).rglob("*.py"))
           if p.name != "protocol.py"]
#: modules that build or read messages: every wire name is checked there. Elsewhere only the
#: unmistakable ones (with '-' or '_'); single words such as "config", "images" or "local" also
#: name results.json fields, checkpoint entries and run-config values.
MESSAGE_MODULES = ("strategies/", "collafuse_flwr/client_app.py", "collafuse_flwr/node/",
                   "collafuse_flwr/harness/disclosure_probe.py", "examples/")
KEYS = P.WIRE_NAMES


def _checked(path: Path) -> set[str]:
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith(MESSAGE_MODULES):
        return set(KEYS)
    return {k for k in KEYS if "-" in k or "_" in k}


def _string_constants(tree: ast.AST):
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def _literal_keys(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    keys = _checked(path)
    return [f"{path.relative_to(ROOT)}:{n.lineno}: {n.value!r}" for n in _string_constants(tree) if n.value in keys]


def test_no_protocol_key_is_spelled_outside_the_protocol_module():
    found = [hit for p in SOURCES for hit in _literal_keys(p)]
    assert not found, "use collafuse_flwr.protocol's names instead of:\n" + "\n".join(found)


def test_the_check_finds_a_spelled_key(tmp_path):
    """The check above can fail: a module that spells a key is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docstrings may say cut-step."""\nconf = {"cut-step": 3}\n')
    tree = ast.parse(bad.read_text())
    assert [n.value for n in _string_constants(tree) if n.value in KEYS] == ["cut-step"]


@pytest.mark.parametrize("method", P.METHODS)
def test_every_method_has_a_record_allowance_both_ways(method):
    for direction in ("down", "up"):
        for category in (P.TRAIN, P.EVALUATE):
            assert P.CONFIG in P.ALLOWED_RECORDS[("down", category, method)]
            assert (direction, category, method) in P.ALLOWED_RECORDS


def test_read_int_refuses_what_a_naive_int_would_take():
    conf = {P.SERVER_ROUND: 1e6, "f": 1.5, "b": True, "s": "3", "ok": 4}
    with pytest.raises(P.ProtocolError, match="outside"):
        P.read_int(conf, P.SERVER_ROUND, 1, 10)
    for key in ("f", "b", "s"):
        with pytest.raises(P.ProtocolError, match="integer"):
            P.read_int(conf, key, 0, 10)
    with pytest.raises(P.ProtocolError, match="missing"):
        P.read_int(conf, "absent", 0, 10)
    assert P.read_int(conf, "ok", 0, 10) == 4 and P.read_int(conf, "absent", 0, 10, default=2) == 2
