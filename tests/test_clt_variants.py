"""Activation variants as objects (clt_lens.clt.activations) and the import graph of clt_lens.clt.

Every registered variant must round-trip through cfg.json, train a step on both decode paths and
load back; the registry, the ``CLTConfig.activation`` Literal and the training config must agree;
the modules of clt_lens/clt must import each other without cycles.
"""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from clt_lens.clt import CLTConfig, CrossLayerTranscoder
from clt_lens.clt.activations import ACTIVATIONS, REGISTRY, ActivationName, get_activation
from clt_lens.clt.loading import load_clt
from clt_lens.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")

L, D, F = 2, 8, 32
CLT_DIR = Path(__file__).resolve().parents[1] / "clt_lens" / "clt"


# ---- the registry ---------------------------------------------------------------------------
def test_registry_literal_and_config_agree():
    assert typing.get_args(ActivationName) == ACTIVATIONS == tuple(REGISTRY)
    hints = typing.get_type_hints(CLTConfig)
    assert typing.get_args(hints["activation"]) == ACTIVATIONS
    for name, act in REGISTRY.items():
        assert act.name == name and get_activation(name) is act
    with pytest.raises(ConfigError, match="activation"):
        get_activation("gelu")
    with pytest.raises(ConfigError, match="activation"):
        CLTConfig(d_in=D, d_sae=F, n_layers=L, activation="gelu")  # type: ignore[arg-type]


def test_training_config_offers_every_registered_activation():
    """TrainConfig holds a CLTSpec, so its choices are the registry's, YAML and CLI included."""
    from clt_lens.config import load_config
    from clt_lens.training.config import TrainConfig

    for name in ACTIVATIONS:
        cfg = load_config(TrainConfig, None, ["--clt.activation", name, "--clt.k", "4"])
        assert cfg.clt.activation == name
    with pytest.raises(ConfigError, match="activation"):
        load_config(TrainConfig, None, ["--activation", "gelu"])


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_variant_round_trips_trains_and_loads(tmp_path, name):
    act = get_activation(name)
    torch.manual_seed(0)
    cfg = CLTConfig(d_in=D, d_sae=F, n_layers=L, activation=name, k=4, dtype="float64")
    clt = CrossLayerTranscoder(cfg)
    assert clt.act is act
    names = dict(clt.named_parameters()) | dict(clt.named_buffers())
    assert set(act.state_names) <= set(names)
    x = torch.randn(64, L, D, dtype=torch.float64)
    y = torch.randn(64, L, D, dtype=torch.float64)
    clt.estimate_normalization(x, y)
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[:, : F // 2] = True

    # one step on each decode path: same losses and gradients, and the weights move
    steps = {}
    for mode in ("dense", "sparse"):
        clt.cfg.decode = mode
        clt.zero_grad()
        out = clt.training_forward(x, y, dead_mask=dead, preact_coeff=1e-2)
        out.loss.backward()
        steps[mode] = (out, {n: p.grad.clone() for n, p in clt.named_parameters()})
        assert out.decode_mode == mode and torch.isfinite(out.loss)
        assert (out.losses["auxk"] > 0) == act.uses_auxk(cfg), out.losses
    (dense, g_dense), (sparse, g_sparse) = steps["dense"], steps["sparse"]
    torch.testing.assert_close(sparse.loss, dense.loss)
    for n in g_dense:
        torch.testing.assert_close(g_sparse[n], g_dense[n], msg=n)
    before = {n: p.detach().clone() for n, p in clt.named_parameters()}
    opt = torch.optim.SGD(clt.parameters(), lr=0.1)
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in clt.named_parameters())
    if act.running_threshold:
        assert (clt.topk_threshold > 0).all()

    # cfg.json keeps the plain string; SAELens and load_clt give back the same CLT
    clt.cfg.decode = "auto"
    clt.eval()
    clt.save_model(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["activation"] == name
    for loaded in (SAE.load_from_disk(tmp_path), load_clt(tmp_path)):
        assert type(loaded) is CrossLayerTranscoder and loaded.act is act
        assert loaded.cfg.to_dict() == clt.cfg.to_dict()
        for key, value in clt.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert torch.equal(loaded.encode(x), clt.encode(x))


# ---- the import graph of clt_lens/clt -------------------------------------------------------
def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top level, inside try/if/with at top
    level, but not under ``if TYPE_CHECKING:`` and not inside functions or classes."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    walk(block)
                for handler in node.handlers:
                    walk(handler.body)
            elif isinstance(node, ast.With):
                walk(node.body)

    walk(tree.body)
    return found


def import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """module -> modules of the package it imports at import time (with the parent packages of
    an imported submodule that are not already being initialised around the importer)."""
    files = {_module_name(p, pkg_dir): p for p in sorted(pkg_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    ancestor = mod == name or mod.startswith(name + ".")
                    if name in files and not ancestor:
                        edges.add(name)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_clt_package_imports_have_no_cycle():
    graph = import_graph(CLT_DIR)
    assert {"clt_lens.clt.model", "clt_lens.clt.losses", "clt_lens.clt.activations.base"} <= set(
        graph
    )
    # the edges the old function-level imports hid are real module-level imports now
    assert "clt_lens.clt.losses" in graph["clt_lens.clt.model"]
    assert "clt_lens.clt.transcoder_view" in graph["clt_lens.clt.model"]
    assert "clt_lens.clt.model" in graph["clt_lens.clt.saelens_interop"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_clt_modules_do_not_import_each_other_inside_functions():
    """A function-level import of a clt_lens.clt module is how a cycle hides; none is needed."""
    hidden = []
    for path in sorted(CLT_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in _module_level_imports(tree)}
        type_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and _is_type_checking(block.test)
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top | type_only:
                if (node.module or "").startswith("clt_lens.clt") or node.level:
                    hidden.append(f"{path.name}:{node.lineno} {node.module}")
    assert not hidden, hidden


def test_cycle_finder_sees_a_cycle(tmp_path):
    pkg = tmp_path / "clt_lens" / "clt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from clt_lens.clt.a import A\n")
    (pkg / "a.py").write_text("from clt_lens.clt.sub.c import C\nA = 1\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from clt_lens.clt.a import A\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from clt_lens.clt.sub.c import C\n")
    (pkg / "sub" / "c.py").write_text("from clt_lens.clt import b\nC = 1\n")
    graph = import_graph(pkg)
    assert find_cycle(graph) is None  # b's import is for type checkers only
    (pkg / "b.py").write_text("from .a import A\n")
    assert find_cycle(import_graph(pkg)) == [
        "clt_lens.clt.a", "clt_lens.clt.sub", "clt_lens.clt.sub.c", "clt_lens.clt.b",
        "clt_lens.clt.a",
    ]  # fmt: skip
