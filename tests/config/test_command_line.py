"""Config files and overrides as `experiments.train` and `research.sweep` read them
(`moe.config.command_line`): one-line errors naming the file, `None` for optional fields."""

from __future__ import annotations

import pathlib

import pytest

from moe.config import command_line

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text,message",
    [
        (None, "{path}: no such config file"),
        ("def get_config(:\n", "{path}: syntax error at line 1: invalid syntax"),
        ("import no_such_module\n", "{path}: raised ModuleNotFoundError: No module named"),
        (
            "def get_config(arg):\n  raise KeyError(arg)\n",
            "{path}: get_config('x') raised KeyError",
        ),
        ("def get_config(arg):\n  return 1\n", "{path}: get_config('x') returned int, not a"),
        ("X = 1\n", "{path}: defines no get_config(arg) function: not a config file"),
    ],
    ids=["missing", "syntax", "import_fails", "raises", "not_a_configdict", "no_get_config"],
)
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, text, message):
  path = tmp_path / "config.py"
  if text is not None:
    path.write_text(text)
  with pytest.raises(ValueError) as error:
    command_line.load_config(f"{path}:x")
  assert str(error.value).startswith(message.format(path=path)) and "\n" not in str(error.value)


def test_none_for_optional_fields_only(monkeypatch):
  monkeypatch.chdir(REPO)
  spec = "configs/switch.py:size=smoke"
  cd = command_line.from_command_line(
      spec, ["model.moe.train_capacity_factor=None", "train.init_from=None", "train.steps=7"]
  )
  assert cd.model.moe.train_capacity_factor is None and cd.train.init_from is None
  assert cd.train.steps == 7
  assert command_line.from_command_line(spec, ["model.moe=None"]).model.moe is None
  with pytest.raises(ValueError, match=r"--config.train.steps=None: invalid literal for int"):
    command_line.from_command_line(spec, ["train.steps=None"])  # Not optional.
  with pytest.raises(ValueError, match=r"--config.train.stepz: no such config field"):
    command_line.from_command_line(spec, ["train.stepz=3"])
