"""Run configuration: one YAML file, validated against `schemas/config.schema.yaml`.

The schema is the single source of defaults, for the CLI and the Snakemake workflow alike.
"""

import copy
import difflib
import functools
import json
import re
from pathlib import Path

import jsonschema
import yaml

from .names import TOPK_VARIANTS

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


# YAML 1.1 (PyYAML) reads `1e-4` as a string: a float needs a dot there. Configs and `--set` values are
# read with YAML 1.2's float forms as well, so that `lr: 1e-4` is the number it looks like.
FLOAT_PATTERN = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


INT_PATTERN = re.compile(r"^[-+]?[0-9][0-9_]*$")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent floats without a dot (`1e-4`, `5E+3`) as floats."""


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_PATTERN, list("-+0123456789."))


def load_yaml(text):
    return yaml.load(text, Loader=ConfigLoader)


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


def coerce_numbers(config, schema=None):
    """Turn strings such as "1e-4" into floats and "8" into ints (where the schema expects an integer), in place, wherever the schema expects a number and no string
    (and inside objects whose keys it leaves free, i.e. random_init); and YAML 1.1's `no` (read as false)
    back into "no" where the schema expects that string (`train.mixed_precision: no`).

    For configs read by another YAML 1.1 reader (Snakemake's `--configfile`) before the schema check."""
    schema = load_schema() if schema is None else schema

    def coerce(value, node):
        types = node.get("type", [])
        types = [types] if isinstance(types, str) else types
        free_form = not types  # inside an object without properties (random_init): LlamaConfig numbers
        if (isinstance(value, str) and (free_form or "number" in types and "string" not in types)
                and FLOAT_PATTERN.match(value.strip())):
            return float(load_yaml(value.strip()))
        if isinstance(value, str) and "integer" in types and "string" not in types and INT_PATTERN.match(value.strip()):
            return int(value.strip().replace("_", ""))  # `--config cluster='{train_gpus: "8"}'`, a quoted YAML number
        if value is False and "string" in types and "no" in node.get("enum", []):  # YAML 1.1 reads `no` as false
            return "no"
        if isinstance(value, dict):
            for key in value:
                value[key] = coerce(value[key], node.get("properties", {}).get(key, {}))
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            value[:] = [coerce(item, node["items"]) for item in value]
        return value

    coerce(config, schema)
    for override in (config.get("train_overrides") or {}).values() if isinstance(config, dict) else ():
        if isinstance(override, dict):  # a variant's train keys, coerced as train's own
            coerce(override, schema["properties"]["train"])
    return config


def validate_config(config):
    """Validate `config` (a dict) in place, filling defaults; raise ConfigError naming the key.

    The schema first, then the rules across keys (`check_cross_fields`)."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping, got {type(config).__name__}")
    schema = load_schema()
    coerce_numbers(config, schema)
    validator = _fill_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
        raise ConfigError(f"invalid config: key {key!r}: {error.message}")
    # second pass: defaults filled inside array items and nested objects are now present
    validator.validate(config)
    check_cross_fields(config)
    return config


# ---------------------------------------------------------------- rules across keys


LEGACY_LLAMA_KEYS = ("rope_theta", "rope_scaling")  # still read by LlamaConfig, into rope_parameters


def llama_config_keys():
    """The fields that `LlamaConfig` reads (its own and PreTrainedConfig's); anything else it keeps unused."""
    import dataclasses

    from transformers import LlamaConfig

    return {field.name for field in dataclasses.fields(LlamaConfig)} | set(LEGACY_LLAMA_KEYS)


def base_intermediate_size(config):
    """The FFN width of the base model when it is known without loading it (random_init, a local config.json)."""
    random_init = config.get("random_init")
    if random_init is not None:
        if "intermediate_size" in random_init:
            return random_init["intermediate_size"], "random_init.intermediate_size"
        from transformers import LlamaConfig

        return LlamaConfig().intermediate_size, "LlamaConfig's default intermediate_size (random_init sets none)"
    config_json = Path(str(config.get("base_model", ""))).expanduser() / "config.json"
    if config_json.is_file():
        try:
            fields = json.loads(config_json.read_text())
        except (OSError, ValueError):
            return None, None  # the base model's loader reports it, naming the file
        fields = fields.get("text_config") or fields
        if isinstance(fields.get("intermediate_size"), int):
            return fields["intermediate_size"], f"intermediate_size of {config_json}"
    return None, None


def _random_init_errors(config):
    random_init = config.get("random_init")
    if random_init is None:
        return []
    known = llama_config_keys()
    errors = []
    for key in random_init:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append((f"random_init.{key}", f"not a LlamaConfig field{hint}; it would be ignored"))
    return errors


def _dsmoe_errors(config):
    settings, errors = config["dsmoe"], []
    n_experts, top_k = settings["n_experts"], settings["top_k"]
    topk = [variant for variant in config["variants"] if variant in TOPK_VARIANTS]
    if topk and top_k > n_experts:
        errors.append(("dsmoe.top_k", f"top_k={top_k} exceeds dsmoe.n_experts={n_experts} (the {topk[0]} variant "
                                      "routes each token to top_k of the n_experts experts)"))
    keep = [k for k in config["baselines"]["drop_keep_experts"] or [] if k > n_experts]
    if keep:
        errors.append(("baselines.drop_keep_experts", f"K={keep[0]} exceeds dsmoe.n_experts={n_experts} (the top-k drop "
                                                      "keeps K of the n_experts experts per token)"))
    size, where = base_intermediate_size(config)
    if isinstance(size, int) and size % n_experts:
        errors.append(("dsmoe.n_experts", f"n_experts={n_experts} does not divide the FFN intermediate size "
                                          f"{size} ({where}); choose a divisor of {size}"))
    return errors


def _train_errors(config):
    train, seq_len, errors = config["train"], config["data"]["seq_len"], []
    batch, micro = train["batch_size"], train["micro_batch_size"]
    if micro < batch and batch % micro:
        errors.append(("train.batch_size", f"batch_size={batch} is not a multiple of train.micro_batch_size={micro}"))
    if train["tokens"] < batch * seq_len:
        errors.append(("train.tokens", f"the token budget {train['tokens']:g} is smaller than one batch, one optimizer "
                                       f"step: train.batch_size {batch} x data.seq_len {seq_len} = {batch * seq_len} tokens"))
    return errors


def _source_errors(config):
    errors, seen = [], {}
    for i, source in enumerate(config["data"]["sources"]):
        name, kind = source["name"], source["kind"]
        if name in seen:
            errors.append((f"data.sources[{i}].name", f"source name {name!r} is also the name of data.sources[{seen[name]}]; "
                                                      "names must be unique"))
        seen.setdefault(name, i)
        if kind != "builtin" and not source.get("path"):
            what = "the dataset id" if kind == "hf" else "a file or glob"
            errors.append((f"data.sources[{i}].path", f"source {name!r} ({kind}) needs `path`, {what}"))
    return errors


def _merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def variant_train(config, variant):
    """The `train` section that trains `variant`: `train` with `train_overrides[variant]` merged over it
    (nested keys one by one); `train` itself for a variant, or a dense row, that the overrides do not name."""
    return _merge(copy.deepcopy(config["train"]), config.get("train_overrides", {}).get(variant, {}))


RUN_WIDE_TRAIN_KEYS = ("tokens", "seed")  # the data and the conversions are made once per run, from these


def _override_errors(config):
    """The variants' train_overrides, checked on a config whose other keys hold: each variant trained here,
    no run-wide key, and the merged section a valid `train`."""
    errors = []
    for variant, override in config["train_overrides"].items():
        key = f"train_overrides.{variant}"
        run_wide = [name for name in RUN_WIDE_TRAIN_KEYS if name in override]
        if variant not in config["variants"]:
            trained = ", ".join(config["variants"]) or "none"
            errors.append((key, f"{variant} is not one of this run's variants ({trained})"))
            continue
        if run_wide:
            errors.append((f"{key}.{run_wide[0]}", f"train.{run_wide[0]} holds for the whole run (its data and "
                                                    "conversions are made once): make another run instead"))
            continue
        trial = {**copy.deepcopy(config), "train": variant_train(config, variant), "train_overrides": {}}
        try:
            validate_config(trial)
        except ConfigError as err:
            errors.append((key, f"the merged train section is invalid: {str(err).removeprefix('invalid config: ')}"))
    return errors


def check_cross_fields(config):
    """The rules that tie keys together, on a config the schema validated (defaults filled).

    Raises one ConfigError that lists every broken rule with its key, so that a run stops before
    any job starts (the Snakemake workflow calls this too, right after its schema check)."""
    errors = _random_init_errors(config) + _dsmoe_errors(config) + _train_errors(config) + _source_errors(config)
    errors = errors or _override_errors(config)  # the overrides on a base that holds: only their own problems
    if errors:
        lines = [f"key {key!r}: {message}" for key, message in errors]
        if len(lines) == 1:
            raise ConfigError(f"invalid config: {lines[0]}")
        raise ConfigError(f"invalid config, {len(lines)} problems:" + "".join(f"\n  {line}" for line in lines))
    return config


def load_config(path, overrides=None):
    """Read, merge `overrides` (a dict) into, and validate a run config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        config = load_yaml(path.read_text()) or {}
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
    """`["train.lr=1e-4", "dsmoe.tau=0.6"]` -> `{"train.lr": 1e-4, "dsmoe.tau": 0.6}` (values parsed as YAML, `1e-4` a float)."""
    overrides = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            overrides[key.strip()] = load_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML: {err}") from err
    return overrides
