"""Where outputs go and what they may replace (issue 12, items 1 and 5).

Every `--out` directory command (convert, base, data prepare, baseline prune, and train's RUN/model)
refuses an existing folder that is not a dsmoe output of its kind, before any work, saying what is
there; `--overwrite` replaces it; a rerun of the same command replaces its own output. `run_name`
(a folder under results/) and data source names cannot leave their parent folder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsmoe.cli import main
from dsmoe.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "my-results"
    folder.mkdir()
    (folder / "notes.md").write_text("a week of notes")
    return folder


def assert_refused(code, err, folder):
    assert code == 2, err
    assert f"{folder} exists and is not a dsmoe output: it holds notes.md" in err and "--overwrite" in err
    assert [p.name for p in folder.iterdir()] == ["notes.md"] and (folder / "notes.md").read_text() == "a week of notes"
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def run_config_file(tmp_path, base_model):
    config = tmp_path / "run.yaml"
    config.write_text(f"base_model: {base_model}\n"
                      "random_init: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
                      "num_attention_heads: 4, num_key_value_heads: 2}\n"
                      "data: {seq_len: 16, val_sequences: 2, sources: [{name: stdlib-prose, kind: builtin}]}\n"
                      "train: {tokens: 1000, batch_size: 2}\n")
    return config


def test_convert_refuses_a_user_folder_before_loading_anything(tiny_model_dir, user_folder, tmp_path, capsys):
    code = main(["convert", "--model", str(tmp_path / "no-such-model"), "--out", str(user_folder)])
    assert_refused(code, capsys.readouterr().err, user_folder)  # the --out check comes first

    out = tmp_path / "converted"
    for _ in range(2):  # a rerun replaces its own output
        assert main(["convert", "--model", str(tiny_model_dir), "--n-experts", "4", "--out", str(out)]) == 0
    assert (out / "dsmoe_output.json").is_file() and (out / "config.json").is_file()
    assert main(["convert", "--model", str(tiny_model_dir), "--n-experts", "4", "--out", str(user_folder),
                 "--overwrite"]) == 0
    assert not (user_folder / "notes.md").exists() and (user_folder / "config.json").is_file()


def test_base_data_and_prune_refuse_a_user_folder(tiny_model_dir, user_folder, tmp_path, capsys):
    config = run_config_file(tmp_path, tiny_model_dir)
    code = main(["base", "--config", str(config), "--out", str(user_folder)])
    assert_refused(code, capsys.readouterr().err, user_folder)
    code = main(["data", "prepare", "--config", str(config), "--model", str(tiny_model_dir), "--out", str(user_folder)])
    assert_refused(code, capsys.readouterr().err, user_folder)
    code = main(["baseline", "prune", "--model", str(tmp_path / "none"), "--kind", "wanda", "--fraction", "0.5",
                 "--data", str(tmp_path / "none"), "--out", str(user_folder)])
    assert_refused(code, capsys.readouterr().err, user_folder)

    data = tmp_path / "data"
    prepare = ["data", "prepare", "--config", str(config), "--model", str(tiny_model_dir), "--out", str(data)]
    assert main(prepare) == 0
    written = (data / "manifest.json").stat().st_mtime_ns
    assert main(prepare) == 0 and (data / "manifest.json").stat().st_mtime_ns == written  # up-to-date cache reused
    assert main(prepare + ["--set", "data.val_sequences=3"]) == 0  # a changed config replaces its own cache
    assert (data / "manifest.json").stat().st_mtime_ns != written
    code = main(["base", "--config", str(config), "--out", str(data)])  # data is not a model
    assert code == 2 and "is a dsmoe data output" in capsys.readouterr().err and (data / "manifest.json").is_file()


def test_train_refuses_a_user_folder_as_its_model_before_training(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "notes.md").write_text("a week of notes")
    config = run_config_file(tmp_path, tiny_model_dir)
    code = main(["train", "--config", str(config), "--init", str(tiny_model_dir), "--data", str(tmp_path / "none"),
                 "--out", str(run)])
    assert_refused(code, capsys.readouterr().err, run / "model")
    assert sorted(p.name for p in run.iterdir()) == ["model"]  # nothing trained, nothing written


@pytest.mark.parametrize("name", ["..", ".", "../elsewhere", "a/b", ".hidden", "a\\b", ""])
def test_run_name_cannot_leave_results(name):
    """Issue 12.5: run_name '..' sent results/<run_name>/ to the repository root."""
    with pytest.raises(ConfigError, match="run_name"):
        validate_config({"run_name": name})
    with pytest.raises(ConfigError, match="data.sources.0.name"):
        validate_config({"data": {"sources": [{"name": name or ".", "kind": "builtin"}]}})


def test_ordinary_run_names_pass():
    for name in ("smoke", "paper-llama-3.2-1b", "run_2.b"):
        assert validate_config({"run_name": name})["run_name"] == name


def test_workflow_refuses_run_name_dotdot_before_any_job(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "config" / "smoke.yaml").read_text().replace("run_name: smoke", 'run_name: ".."'))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                             str(tmp_path), "--configfile", str(config), "-n"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "run_name" in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".snakemake") == ["bad.yaml"]
