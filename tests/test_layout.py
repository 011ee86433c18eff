"""The rooms and which way imports run (shared/DESIGN.md): these are the rules, not the current state.

storage knows nothing of voice, signaling, web, agent or the composition root; agent knows nothing of
storage, voice, signaling or web; voice knows nothing of signaling or web; signaling knows nothing of
web; jobs (workflow runs, schedules) may use storage and agent but nothing of voice, signaling or web, and
only the composition root and web use jobs. Every import counts, including ones inside functions and under
TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pono

PACKAGE = Path(pono.__file__).parent
COMPOSITION_ROOT = {"pono.app", "pono.calls", "pono.context", "pono.cli", "pono.operators", "pono.recordings",
                    "pono.__main__"}
FORBIDDEN = {
    "storage": {"pono.voice", "pono.signaling", "pono.web", "pono.agent", "pono.jobs", *COMPOSITION_ROOT},
    "agent": {"pono.storage", "pono.voice", "pono.signaling", "pono.web", "pono.jobs", *COMPOSITION_ROOT},
    "voice": {"pono.signaling", "pono.web", "pono.storage", "pono.jobs", *COMPOSITION_ROOT},
    "signaling": {"pono.web", "pono.jobs", *COMPOSITION_ROOT},
    # jobs (workflows, schedules) sit beside web: they may use storage and agent, and nothing that serves calls.
    "jobs": {"pono.voice", "pono.signaling", "pono.web", *COMPOSITION_ROOT},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute, including relative and function-level imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def edges() -> list[tuple[str, str]]:
    result = []
    for path in sorted(PACKAGE.rglob("*.py")):
        result.extend((module_name(path), target) for target in imports_of(path) if target.startswith("pono"))
    return result


def violations(all_edges: list[tuple[str, str]]) -> list[str]:
    bad = []
    for source, target in all_edges:
        parts = source.split(".")
        room = parts[1] if len(parts) > 1 else ""
        for forbidden in FORBIDDEN.get(room, ()):
            if target == forbidden or target.startswith(forbidden + "."):
                bad.append(f"{source} imports {target}")
    return sorted(set(bad))


def test_imports_run_down_the_rooms() -> None:
    assert violations(edges()) == []


def test_the_rule_checker_sees_a_wrong_edge() -> None:
    # The checker itself must catch what the rules forbid, or the test above could never fail.
    assert violations([("pono.storage.writer", "pono.voice.call.Call"),
                       ("pono.agent.dlp.apply", "pono.storage.records"),
                       ("pono.voice.call", "pono.signaling.webrtc"),
                       ("pono.storage.db", "pono.events"),
                       ("pono.jobs.runner", "pono.web.params"),
                       ("pono.storage.workflows", "pono.jobs.definition")]) == [
        "pono.agent.dlp.apply imports pono.storage.records",
        "pono.jobs.runner imports pono.web.params",
        "pono.storage.workflows imports pono.jobs.definition",
        "pono.storage.writer imports pono.voice.call.Call",
        "pono.voice.call imports pono.signaling.webrtc",
    ]


def test_relative_and_nested_imports_are_counted() -> None:
    assert "pono.voice.call" in imports_of(PACKAGE / "calls.py")
    assert any(e[0].startswith("pono.storage") for e in edges())


def test_modules_stay_small() -> None:
    # A file past ~400 lines does more than one job.
    long = [f"{module_name(p)}: {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420]
    assert long == []
