"""The type stubs declare everything the native module has, so editors complete it all."""

import ast
import inspect
from pathlib import Path

import llmd
import llmd._llmd as native

STUB = Path(llmd.__file__).with_name("_llmd.pyi")


def _declared():
    tree = ast.parse(STUB.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            out[node.name] = members
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = set()
    return out


def test_every_native_name_and_member_is_in_the_stub():
    declared = _declared()
    for name, obj in vars(native).items():
        if name.startswith("_") and name != "__version__":
            continue
        assert name in declared, f"{name} missing from {STUB.name}"
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            public = {m for m in vars(obj) if not m.startswith("_")}
            assert public <= declared[name], f"{name}: {public - declared[name]} not in stub"


def test_package_exports():
    for name in llmd.__all__:
        assert hasattr(llmd, name)
    assert STUB.is_file() and Path(llmd.__file__).with_name("py.typed").is_file()
