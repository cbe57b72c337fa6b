"""Load a config file and apply `--config.a.b=value` overrides, typed by the schema."""

import ast
import importlib.util
import json
import os

import ml_collections

from resnet_jax.config_schema import (KEYS_BY_NAME, _flatten, _flatten_plain, base_config,
                                      check_keys_and_types, suggest)
from resnet_jax.errors import ConfigError


def config_from_dict(values: dict, source: str) -> ml_collections.ConfigDict:
  """A config from its resolved JSON form (a run's config.json, a checkpoint's metadata):
  the schema's base with every recorded key set, lists back to tuples. ConfigError naming
  `source` for a key the schema does not know."""
  config = base_config()
  schema = _flatten(config)
  for key, value in _flatten_plain(values).items():
    if key not in schema:
      raise ConfigError(f"{source}: unknown config key '{key}' (recorded by another version "
                        "of resnet_jax?)")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  check_keys_and_types(config)
  return config


def load_recorded(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded in its workdir (config.json)."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      values = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{workdir} holds no config.json (not a run's workdir?)") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} cannot be read: {e}") from None
  return config_from_dict(values, path)


def split_config_arg(path: str) -> tuple[str, str | None]:
  """`configs/x.py:arg` -> ("configs/x.py", "arg"); a plain path -> (path, None)."""
  file, sep, arg = path.rpartition(".py:")
  return (file + ".py", arg) if sep else (path, None)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """The ConfigDict of a config file's `get_config()`, or of `get_config(arg)` for
  `FILE.py:arg` (one file, several experiments: big_vision's convention)."""
  path, arg = split_config_arg(path)
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "not found"
    raise ConfigError(f"config file {path} {what} (expected a .py file defining get_config(), "
                      "e.g. configs/digits_resnet20.py)")
  if not path.endswith(".py"):
    hint = (" (a run's recorded config.json: rerun with the config file it came from, or "
            "evaluate the workdir with eval_only)" if path.endswith(".json") else "")
    raise ConfigError(f"config file {path}: expected a Python file (.py) defining "
                      f"get_config(){hint}")
  spec = importlib.util.spec_from_file_location(
      "resnet_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SystemExit as e:
    raise ConfigError(f"config file {path} called sys.exit({e.code!r}) while loading") from None
  except Exception as e:  # the file itself is broken: say which file and why
    raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: "
                      f"{_one_line(e)}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  call = f"get_config({arg!r})" if arg is not None else "get_config()"
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except SystemExit as e:
    raise ConfigError(f"{path}: {call} called sys.exit({e.code!r})") from None
  except Exception as e:
    raise ConfigError(f"{path}: {call} failed: {type(e).__name__}: {_one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: {call} must return an ml_collections.ConfigDict, not "
                      f"{type(config).__name__}")
  return config


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ""


def _parse_value(key: str, text: str, default):
  """Parse `text` into the type of the schema's default for `key`."""
  def fail(expected):
    raise ConfigError(f"config key '{key}' must be {expected}, got {text!r}")

  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    fail("a bool (true/false)")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      fail("an int")
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      fail("a float")
  if isinstance(default, (tuple, list)):
    declared = KEYS_BY_NAME.get(key)
    elem = (declared.element if declared and declared.element else
            type(default[0]) if default else None)
    if elem is str:        # a,b,c or ('a', 'b')
      stripped = text.strip()
      if stripped.startswith(("(", "[")):
        try:
          value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
          fail("a tuple of strings such as 'stem,stage1'")
      else:
        value = tuple(part.strip() for part in stripped.split(",") if part.strip())
      if not all(isinstance(v, str) for v in value):
        fail("a tuple of strings such as 'stem,stage1'")
      return tuple(value)
    try:
      value = ast.literal_eval(text if text.strip().startswith(("(", "[")) else f"({text},)")
    except (ValueError, SyntaxError):
      fail("a tuple such as '30,60,90'")
    if not isinstance(value, (tuple, list)):
      value = (value,)
    if elem is float and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             for v in value):
      return tuple(float(v) for v in value)
    if elem is not None and not all(isinstance(v, elem) for v in value):
      fail(f"a tuple of {elem.__name__}")
    return tuple(value)
  return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  schema = _flatten(base_config())
  for key, text in overrides.items():
    if key not in schema:
      raise ConfigError(f"unknown config key '{key}'{suggest(key, schema)}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = _parse_value(key, text, schema[key])


def resolve(path: str, overrides: dict[str, str]) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config a run uses: the file, its overrides, checked against the schema's keys and
  types, and settled where it depends on files (the model.pretrained file's preprocessing).
  Returns (config, lines to log saying what was settled). Values that depend on the devices
  are checked later (config_schema.check_values)."""
  from resnet_jax.training import pretrained
  config = load_config_file(path)
  apply_overrides(config, overrides)
  check_keys_and_types(config)
  return config, pretrained.settle_preprocessing(config)


def parse_overrides(args: list[str]) -> dict[str, str]:
  """`--config.KEY=VALUE` arguments as {KEY: VALUE}; ConfigError for anything else."""
  overrides = {}
  for arg in args:
    if not (arg.startswith("--config.") and "=" in arg):
      raise ConfigError(f"cannot parse argument {arg!r}; expected --config.KEY=VALUE")
    key, value = arg[len("--config."):].split("=", 1)
    overrides[key] = value
  return overrides


FLAGS = ("config", "workdir")          # value flags: --NAME=VALUE or --NAME VALUE
SWITCHES = ("allow_config_change",)   # --NAME alone


def parse_args(argv: list[str]) -> tuple[str, dict[str, str], dict[str, str]]:
  """Split argv into (config path, {config overrides}, {flags}); ConfigError naming the
  argument for anything else. Value flags take `--flag=VALUE` or `--flag VALUE`;
  `--config.KEY=VALUE` overrides; switches stand alone."""
  config_path, overrides, flags = None, {}, {}
  args = list(argv)
  while args:
    arg = args.pop(0)
    if not arg.startswith("--"):
      raise ConfigError(f"cannot parse argument {arg!r}; expected --config=FILE, "
                        "--config.KEY=VALUE or --workdir=DIR (see --help)")
    name, has_value, value = arg[2:].partition("=")
    if name.startswith("config."):
      if not has_value:
        raise ConfigError(f"{arg}: expected --{name}=VALUE")
      overrides[name[len("config."):]] = value
      continue
    if name in SWITCHES:
      if has_value:
        raise ConfigError(f"--{name} takes no value (got {arg!r})")
      flags[name] = "1"
      continue
    if name not in FLAGS:
      hint = suggest(name, FLAGS + SWITCHES).replace("'", "'--", 1)
      raise ConfigError(f"unknown flag --{name}{hint}; expected --config, --config.KEY, "
                        "--workdir or --allow_config_change (see --help)")
    if not has_value:
      if not args or args[0].startswith("--"):
        raise ConfigError(f"--{name}: expected a value (--{name}=VALUE or --{name} VALUE)")
      value = args.pop(0)
    if not value.strip():
      raise ConfigError(f"--{name}: expected a {'file' if name == 'config' else 'directory'}"
                        ", got an empty value")
    if name in flags or (name == "config" and config_path is not None):
      raise ConfigError(f"--{name} given twice")
    if name == "config":
      config_path = value
    else:
      flags[name] = value
  if config_path is None:
    raise ConfigError("missing --config=FILE (see --help)")
  return config_path, overrides, flags
