"""What a run needs from the Hugging Face Hub: fetched where there is internet, checked where there is none.

Many clusters' compute nodes have no internet. `dsmoe fetch --config C`, run first on the login node,
downloads into the Hugging Face cache (HF_HOME, on the shared filesystem) everything a run of config C
reads from the Hub:

  - the base model (a Hub id; the embedded short names and local directories need nothing): its
    config, tokenizer and safetensors files;
  - the `hf` data sources: the files of the subset / data_dir the `data` rule streams;
  - the lm-eval task datasets (the paper suite; the local suite needs none; storycloze_2016 reads
    CSV files given by hand).

The workflow's jobs on a cluster run with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (the rules' shell
prefix in remote jobs, workflow/rules/common.smk, unless config cluster.offline is false), and the first
jobs (`base_model`, `data`) run `dsmoe fetch --config C --check` before loading anything: it names
every missing item and the command that fetches it, and fails. `--check` reads only the cache.
"""

import logging
import os
from pathlib import Path

from .hub import SHORT_NAMES, is_local

logger = logging.getLogger(__name__)

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]  # config, tokenizer, weights
KINDS = ("model", "data", "tasks")


class MissingFromCache(ValueError):
    pass


def hub_model(config):
    """The base model's Hub id, or None when it is an embedded short name or a local directory."""
    name = str(config["base_model"])
    return None if name in SHORT_NAMES or is_local(name) else name


def hf_sources(config):
    return [source for source in config["data"]["sources"] if source["kind"] == "hf"]


def task_names(config):
    """The lm-eval tasks whose datasets come from the Hub: eval.bench_tasks or the suite's, less
    eval.skip_tasks and the local tasks (dsmoe's own and storycloze_2016, read from files)."""
    from .evaluation.harness import LOCAL_SUITE, STORYCLOZE_TASK, SUITES

    settings = config["eval"]
    names = settings["bench_tasks"] or list(SUITES[settings["bench_suite"]])
    local = set(LOCAL_SUITE) | {STORYCLOZE_TASK}
    return [name for name in names if name not in settings["skip_tasks"] and name not in local]


def needs(config, kinds=KINDS):
    """[(kind, name)] of everything config reads from the Hub."""
    items = []
    if "model" in kinds and hub_model(config):
        items.append(("model", hub_model(config)))
    if "data" in kinds:
        items += [("data", source["path"]) for source in hf_sources(config)]
    if "tasks" in kinds:
        items += [("tasks", name) for name in task_names(config)]
    return items


# ---------------------------------------------------------------- the cache, read offline


def cached_snapshot(repo_id, repo_type="model"):
    """The cached snapshot directory of repo_id's main revision, or None (reads only the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def model_missing(repo_id):
    """What the cache lacks of a Hub model: '' when config, tokenizer and every weight file are there."""
    import json

    snapshot = cached_snapshot(repo_id)
    if snapshot is None:
        return "not in the cache"
    lacking = [name for name in ("config.json",) if not (snapshot / name).is_file()]
    if not any((snapshot / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        lacking.append("tokenizer files")
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        lacking += [shard for shard in shards if not (snapshot / shard).is_file()]
    elif not (snapshot / "model.safetensors").is_file():
        lacking.append("model.safetensors")
    return f"lacks {', '.join(lacking)}" if lacking else ""


def dataset_missing(source):
    """What the cache lacks of an hf source: '' when its snapshot (README and each data_dir) is there."""
    snapshot = cached_snapshot(source["path"], "dataset")
    if snapshot is None:
        return "not in the cache"
    data_dirs = source.get("data_dir")
    data_dirs = data_dirs if isinstance(data_dirs, list) else [data_dirs] if data_dirs else []
    lacking = [f"data_dir {d}" for d in data_dirs if not any((snapshot / d).glob("*"))]
    if not data_dirs and not any(path.is_file() and path.name != "README.md" for path in snapshot.rglob("*")):
        lacking.append("data files")
    return f"lacks {', '.join(lacking)}" if lacking else ""


def dataset_path(source):
    """Where the data rule streams an hf source from: its cached snapshot when the Hub is offline, else its id."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        snapshot = cached_snapshot(source["path"], "dataset")
        if snapshot is not None:
            return str(snapshot)
    return source["path"]


def task_missing(name):
    """'' when lm-eval task `name` builds from the datasets cache alone (HF_DATASETS_OFFLINE)."""
    from .evaluation.harness import make_task_manager

    previous = {var: os.environ.get(var) for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({var: "1" for var in previous})
    try:
        from lm_eval.tasks import get_task_dict

        get_task_dict([name], make_task_manager([name]))
        return ""
    except Exception as err:  # noqa: BLE001  (datasets raises many types for a dataset it cannot find offline)
        return f"its dataset is not in the cache ({type(err).__name__}: {str(err)[:200]})"
    finally:
        for var, value in previous.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def missing(config, kinds=KINDS):
    """[(kind, name, why)] of what the cache lacks for config; reads only the cache."""
    found = []
    sources = {source["path"]: source for source in hf_sources(config)}
    for kind, name in needs(config, kinds):
        why = {"model": model_missing, "data": lambda n: dataset_missing(sources[n]), "tasks": task_missing}[kind](name)
        if why:
            found.append((kind, name, why))
    return found


def check(config, config_path, kinds=KINDS):
    """Raise MissingFromCache naming every missing item (before a job loads anything)."""
    lacking = missing(config, kinds)
    if lacking:
        from huggingface_hub import constants

        lines = "\n".join(f"  - {kind} {name!r}: {why}" for kind, name, why in lacking)
        raise MissingFromCache(f"the Hugging Face cache ({constants.HF_HUB_CACHE}) lacks what this run reads from the "
                               f"Hub, and this job is offline:\n{lines}\nRun `dsmoe fetch --config {config_path}` on a "
                               "machine with internet (the login node) with the same HF_HOME, then resubmit")


# ---------------------------------------------------------------- downloads, online


def source_patterns(source):
    """The repository files an hf source streams: its data_dir folders, or its subset's data files."""
    data_dirs = source.get("data_dir")
    if data_dirs:
        data_dirs = data_dirs if isinstance(data_dirs, list) else [data_dirs]
        return ["README.md", *[f"{d}/**" for d in data_dirs]]
    if source.get("data_files"):
        files = source["data_files"]
        return ["README.md", *([files] if isinstance(files, str) else files)]
    import datasets

    builder = datasets.load_dataset_builder(source["path"], source.get("subset"))
    split = source.get("split", "train")
    urls = (builder.config.data_files or {}).get(split, [])
    return ["README.md", *[url.split("@", 1)[-1].split("/", 1)[-1] for url in urls]]


def fetch(config, kinds=KINDS):
    """Download everything config reads from the Hub into the cache; returns [(kind, name, where)]."""
    from huggingface_hub import snapshot_download

    done = []
    for kind, name in needs(config, kinds):
        logger.info("fetching %s %s", kind, name)
        if kind == "model":
            where = snapshot_download(name, allow_patterns=MODEL_PATTERNS)
        elif kind == "data":
            source = next(s for s in hf_sources(config) if s["path"] == name)
            where = snapshot_download(name, repo_type="dataset", allow_patterns=source_patterns(source))
        else:
            from lm_eval.tasks import get_task_dict

            from .evaluation.harness import make_task_manager

            get_task_dict([name], make_task_manager([name]))  # lm-eval downloads and prepares the dataset
            where = "the datasets cache"
        done.append((kind, name, where))
    return done


# ---------------------------------------------------------------- CLI: dsmoe fetch


def register(subparsers):
    p = subparsers.add_parser("fetch", help="download what a run reads from the Hugging Face Hub (run it on the login "
                                            "node), or --check that the cache holds it")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--check", action="store_true", help="only read the cache: name what is missing, exit 1 if anything is")
    p.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS), help="what to fetch or check")
    p.set_defaults(func=cmd_fetch)


def cmd_fetch(args):
    from .config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    if args.check:
        check(config, args.config, args.only)
        print(f"the Hugging Face cache holds all {len(needs(config, args.only))} item(s) this run reads from the Hub")
        return
    done = fetch(config, args.only)
    for kind, name, where in done:
        print(f"{kind} {name}: {where}")
    print(f"fetched {len(done)} item(s); compute jobs read them offline (HF_HUB_OFFLINE=1) from the same HF_HOME")
