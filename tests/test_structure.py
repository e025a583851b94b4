"""The package's shape: no import cycle inside `moe`, no dependency of `moe` on the checkout's
`configs/` or on the research tooling (`research/`), and the experiments run against a non-editable
install."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: frozenset[str] = frozenset()) -> set[str]:
  """Every module that `path` imports, at the top or inside a function. `from pkg import x` counts as
  pkg.x when that is one of `modules`, else as pkg."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        names.add(sub if sub in modules else node.module)
  return names


def _graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  names = frozenset(modules)
  return {
      name: {m for m in _imports(path, names) if m in modules} for name, path in modules.items()
  }


def test_no_import_cycle_in_moe():
  graph = _graph()
  assert {"moe.config.model", "moe.parallel.sharding", "moe.trainer.loop"} <= set(graph)
  state: dict[str, str] = {}

  def visit(node: str, stack: list[str]) -> None:
    state[node] = "open"
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep) :] + [dep]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_moe_imports_neither_configs_nor_research():
  for path in PACKAGE.rglob("*.py"):
    outside = [m for m in _imports(path) if m.split(".")[0] in ("configs", "research")]
    assert not outside, (path, outside)


def fresh_python(script: str) -> str:
  """The standard output of `script` run in a new interpreter from the checkout."""
  return subprocess.run(
      [sys.executable, "-c", script],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  ).stdout


def test_importing_the_library_reads_no_file_of_configs():
  """Every module of `moe` imported in a fresh interpreter, with an audit hook on `open`: none of
  them reads a file under the checkout's configs/ (a path string built at run time would pass an
  import check)."""
  script = (
      "import importlib, pathlib, pkgutil, sys\n"
      f"configs = pathlib.Path({str(ROOT / 'configs')!r})\n"
      "opened = []\n"
      "def hook(event, args):\n"
      "  if event == 'open' and isinstance(args[0], str) and pathlib.Path(args[0]).resolve()"
      ".is_relative_to(configs):\n"
      "    opened.append(args[0])\n"
      "sys.addaudithook(hook)\n"
      "import moe\n"
      "for info in pkgutil.walk_packages(moe.__path__, 'moe.'):\n"
      "  importlib.import_module(info.name)\n"
      "print(len(opened), opened)\n"
  )
  out = fresh_python(script)
  assert out.startswith("0 []"), out


@pytest.mark.timeout(600)
def test_compare_runs_from_a_non_editable_install(tmp_path):
  """`pip install .` (a wheel: only `moe` is packaged), then the main job from a directory that holds
  experiments/, configs/ and research/ but no moe/: the library must come from site-packages."""
  site, source = tmp_path / "site", tmp_path / "source"
  # Built from a copy: pip builds in the source tree, and the checkout must stay as it is.
  shutil.copytree(ROOT / "moe", source / "moe", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  subprocess.run(
      [
          sys.executable,
          "-m",
          "pip",
          "install",
          "-q",
          "--no-deps",
          "--no-build-isolation",
          "--target",
          str(site),
          str(source),
      ],
      check=True,
      capture_output=True,
      text=True,
  )
  assert (site / "moe" / "trainer" / "loop.py").exists()
  assert not (site / "configs").exists() and not (site / "research").exists()
  work = tmp_path / "work"
  for name in ("experiments", "configs", "research"):
    shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(
      [sys.executable, "-c", "import moe; print(moe.__file__)"],
      cwd=work,
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  assert out.strip().startswith(str(site))
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.compare",
          "--size=smoke",
          "--steps=1",
          f"--workdir_root={tmp_path / 'runs'}",
      ],
      cwd=work,
      env=env,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  import configs.regimes  # pylint: disable=g-import-not-at-top

  assert f"| {configs.regimes.MAIN}_smoke | 1 |" in result.stdout, result.stdout[-3000:]
  assert "gap (sparse - dense) =" in result.stdout
  assert (tmp_path / "runs" / "comparison.json").exists()
  # Both runs, sparse and dense, unrolled (experiments.compare: the faster layout at 4 layers).
  written = sorted((tmp_path / "runs").glob("*/seed0/config.json"))
  assert len(written) == 2, written
  assert [json.loads(p.read_text())["model"]["scan_layers"] for p in written] == [False, False]


def test_modules_the_tests_import_define_no_absl_flags():
  """absl's flag registry is global to a process: a flag defined at import by a command-line module
  that a test imports clashes with another module's flag of the same name, and a required one makes
  every other absl program of that pytest worker exit (experiments.evaluate's --output against
  research.split_losses's did both). Their flags are defined only when they run as programs."""
  script = (
      "from absl import app, flags\n"
      "import moe.trainer.evaluation, research.statistics\n"  # Their libraries' own flags.
      "before = set(flags.FLAGS)\n"
      "import experiments.evaluate, research.split_losses\n"
      "print(sorted(set(flags.FLAGS) - before))\n"
  )
  out = fresh_python(script)
  assert out.strip() == "[]", out
