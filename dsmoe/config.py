"""Run configuration: one YAML file, validated against `schemas/config.schema.yaml`.

The schema is the single source of defaults, for the CLI and the Snakemake workflow alike.
"""

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


@functools.cache
def _schema_text():
    return SCHEMA_PATH.read_text()


def load_schema():
    return yaml.safe_load(_schema_text())


def schema_default(dotted_key):
    """The schema's default of a key such as `dsmoe.n_experts` (the single source of defaults)."""
    node = load_schema()
    for part in dotted_key.split("."):
        node = node["properties"][part]
    return copy.deepcopy(node["default"])


def _fill_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def validate_config(config):
    """Validate `config` (a dict) in place, filling defaults; raise ConfigError naming the key."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping, got {type(config).__name__}")
    schema = load_schema()
    validator = _fill_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
        raise ConfigError(f"invalid config: key {key!r}: {error.message}")
    # second pass: defaults filled inside array items and nested objects are now present
    validator.validate(config)
    return config


def load_config(path, overrides=None):
    """Read, merge `overrides` (a dict) into, and validate a run config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    for key, value in (overrides or {}).items():
        _set_dotted(config, key, value)
    return validate_config(config)


def _set_dotted(config, dotted_key, value):
    *parents, last = dotted_key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def parse_overrides(pairs):
    """`["train.lr=1e-4", "dsmoe.tau=0.6"]` -> `{"train.lr": 1e-4, "dsmoe.tau": 0.6}` (values parsed as YAML)."""
    overrides = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides
