"""The import contract: builder.cli on top; builder's rooms never import trainer; trainer uses builder.core only;
builder.core imports no other room; no module imports another in a loop. Read from the source by tests/layers.py
(every import, at module level or inside a function)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO
from tests.layers import cycles, imports, modules, room, room_graph

BUILDER_DOMAINS = ("builder.image", "builder.instance", "builder.selftest", "builder.wheels")
# The order of trainer's rooms, bottom first: a room imports only rooms below it.
TRAINER_ORDER = ("trainer.config", "trainer.data", "trainer.fused", "trainer.model", "trainer.loop", "trainer.serve")
# trainer.config validates data.format against the format registry's names; the registry imports nothing of trainer
# (checked below), so the edge is a leaf lookup, not a loop.
ALLOWED_UPWARD = {("trainer.config", "trainer.data.formats")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return imports()


def _edges(graph: dict[str, set[str]]):
    for mod, targets in sorted(graph.items()):
        for target in sorted(targets):
            yield mod, target


def test_the_reader_sees_imports_at_every_level(graph) -> None:
    # a module-level import, a function-level one and a `from package import module` one
    assert "builder.core.errors" in graph["builder.cli"]
    assert "trainer.model.hub" in graph["trainer.loop.preflight"]  # imported inside a function
    assert "builder.selftest.kernel_probes" in graph["builder.cli.selftest"]


def test_no_module_imports_another_in_a_loop(graph) -> None:
    assert cycles(graph) == []


def test_the_reader_finds_a_planted_loop() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c"]]


def test_only_the_entry_points_import_the_cli(graph) -> None:
    bad = [(m, t) for m, t in _edges(graph) if room(t) == "builder.cli" and room(m) not in ("builder.cli",)
           and m != "builder.__main__"]
    assert bad == []


def test_builder_core_imports_no_other_room(graph) -> None:
    bad = [(m, t) for m, t in _edges(graph) if room(m) == "builder.core" and room(t) not in ("builder.core", "builder")]
    assert bad == []


def test_builders_domains_never_import_the_trainer_or_the_cli(graph) -> None:
    bad = [(m, t) for m, t in _edges(graph)
           if room(m) in BUILDER_DOMAINS and (t.startswith("trainer") or room(t) == "builder.cli")]
    assert bad == []
    assert cycles(room_graph({m: t for m, t in graph.items() if room(m).startswith("builder")})) == []


def test_the_trainer_uses_builder_core_only_and_its_rooms_point_down(graph) -> None:
    to_builder = [(m, t) for m, t in _edges(graph)
                  if m.startswith("trainer") and t.startswith("builder") and room(t) not in ("builder.core", "builder")]
    assert to_builder == []
    upward = [(m, t) for m, t in _edges(graph) if m.startswith("trainer") and t.startswith("trainer")
              and room(m) in TRAINER_ORDER and room(t) in TRAINER_ORDER
              and TRAINER_ORDER.index(room(t)) > TRAINER_ORDER.index(room(m))
              and (room(m), t) not in ALLOWED_UPWARD]
    assert upward == []
    for _, target in ALLOWED_UPWARD:
        assert not any(t.startswith("trainer") for t in graph[target]), f"{target} must stay a leaf"
    assert {room(m) for m in modules() if m.startswith("trainer.")} <= set(TRAINER_ORDER)


SAMEBOX_READ = re.compile(r"""(environ|env)\s*(\.get\(|\[)\s*f?["']SAMEBOX_|getenv\(\s*f?["']SAMEBOX_""")


def test_no_samebox_variable_is_read_outside_settings() -> None:
    readers = [f"{path.relative_to(REPO)}:{n}" for mod, path in modules().items() if mod != "builder.core.settings"
               for n, line in enumerate(path.read_text().splitlines(), 1) if SAMEBOX_READ.search(line)]
    assert readers == [], "read SAMEBOX_* through builder.core.settings"
    assert SAMEBOX_READ.search('x = os.environ.get("SAMEBOX_FOO")') and SAMEBOX_READ.search("env[f'SAMEBOX_{n}']")
