"""Issue #13, "a first run that works for everyone": a wrong command fails at once with one line
that says what to do (exit 2, no traceback), and the presets a first run picks work as published.

The internet cannot exist here, so an unreachable hub is a closed port on loopback (a real
"connection refused"), and an offline machine is ``HF_HUB_OFFLINE=1`` with an empty ``HF_HOME``.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import datasets
import pytest
import yaml

from conftest import run_cli, write_jsonl

from cpo_exp.assets import locate
from cpo_exp.data.adapters import alma_r
from cpo_exp.data.schema import ROW_ID, DataError

MODEL_ID = "Qwen/Qwen2-0.5B-Instruct"
SHORT = ["train.max_steps=2", "train.logging_steps=1", "train.per_device_train_batch_size=2",
         "train.per_device_eval_batch_size=2", "data.max_eval_samples=4", "train.save_model=false", "tracking=none"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    """An empty Hugging Face home: no cached models, no cached datasets."""
    return tmp_path / "hf_home"


@pytest.fixture
def no_hub(hf_home: Path) -> dict:
    """The hub endpoint refuses connections; offline mode is off, whatever the developer's shell says."""
    return {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}


@pytest.fixture
def offline(hf_home: Path) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}


def the_error_line(result) -> str:
    """The run failed as a wrong command must: exit 2, no traceback, one line on stderr: the error."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "[ERROR]" in lines[0], lines
    return lines[0]


# --------------------------------------------------------------------------- hub ids


def test_model_id_on_an_unreachable_hub_fails_in_one_line_without_retries(workdir, no_hub):
    result = run_cli("model=hf", f"model.name_or_path={MODEL_ID}", cwd=workdir, env=no_hub)
    assert not (workdir / "mlflow.db").exists()  # decided before a tracking run was opened
    line = the_error_line(result)
    assert f"model.name_or_path={MODEL_ID}" in line
    assert "cannot be reached" in line and no_hub["HF_ENDPOINT"] in line and "Connection refused" in line
    assert "not in the local cache" in line and "local folder" in line
    # huggingface_hub's backoff (five retries, about a minute) never started
    assert "Retrying" not in result.stderr


def test_model_id_offline_and_not_cached_says_so(workdir, offline):
    result = run_cli("model=hf", f"model.name_or_path={MODEL_ID}", "tracking=none", cwd=workdir, env=offline)
    line = the_error_line(result)
    assert f"model.name_or_path={MODEL_ID}" in line and "HF_HUB_OFFLINE is set" in line
    assert "not in the local cache" in line and "local folder" in line


def test_a_tokenizer_id_is_named_by_its_own_key(workdir, offline):
    result = run_cli("model.tokenizer=nobody/no-tokenizer", "tracking=none", cwd=workdir, env=offline)
    assert "model.tokenizer=nobody/no-tokenizer: HF_HUB_OFFLINE is set" in the_error_line(result)


def test_a_path_that_does_not_exist_is_named_with_its_absolute_path(workdir):
    result = run_cli("model=hf", "model.name_or_path=./models/mine", "tracking=none", cwd=workdir)
    line = the_error_line(result)
    assert f"model.name_or_path=./models/mine: no such file or folder (resolved to {workdir.resolve() / 'models' / 'mine'}" in line


def cache_model(hf_home: Path, repo_id: str) -> None:
    """The embedded tiny model's files laid out as huggingface_hub caches a download."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(locate("pkg://cpo_exp/assets/tiny_qwen2"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_cached_model_id_trains_offline_and_when_the_hub_is_down(workdir, hf_home, offline, no_hub):
    cache_model(hf_home, "cpo-exp-tests/tiny-qwen2")
    _, hub_down = trains_offline_and_with_the_hub_down(
        "model.name_or_path=cpo-exp-tests/tiny-qwen2", ("model=hf", "model.random_init=true"), workdir, offline, no_hub)
    assert hub_down.count("is read from the local cache") == 1  # once, not per file


def trains_offline_and_with_the_hub_down(hub_id: str, args: tuple, workdir, offline, no_hub) -> tuple[str, str]:
    """Train with ``hub_id`` (a ``key=<id>`` override) offline, then with the hub unreachable; both stderrs."""
    stderrs = []
    for env in (offline, no_hub):
        result = run_cli(*args, hub_id, *SHORT, cwd=workdir, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        stderrs.append(result.stderr)
    assert f"{hub_id} is read from the local cache" in stderrs[1]
    assert "Retrying" not in stderrs[1]
    return stderrs[0], stderrs[1]


def test_dataset_id_on_an_unreachable_hub_fails_in_one_line_without_retries(workdir, no_hub):
    result = run_cli("data=ultrafeedback", "tracking=none", cwd=workdir, env=no_hub)
    line = the_error_line(result)
    assert "data.path=trl-lib/ultrafeedback_binarized" in line and "cannot be reached" in line
    assert "not in the local cache" in line and "local folder" in line
    assert "Retrying" not in result.stderr


def cache_dataset(hf_home: Path, repo_id: str, rows: list[dict], workdir: Path) -> None:
    """``rows`` as train and test splits, laid out as ``datasets`` caches a hub download."""
    from datasets.packaged_modules.json.json import Json

    source = write_jsonl(workdir / "rows.jsonl", rows)
    owner, name = repo_id.split("/")
    cache = hf_home / "datasets"
    Json(cache_dir=str(cache), dataset_name=name, config_name="default", hash="0" * 16,
         data_files={"train": str(source), "test": str(source)}).download_and_prepare()
    # A hub download lives under <owner>___<name>/<config>/; a local build, under <name>/<config>-<hash>/.
    built = next((cache / name).iterdir())
    (cache / f"{owner}___{name}").mkdir()
    built.rename(cache / f"{owner}___{name}" / "default")


@pytest.mark.slow
def test_cached_dataset_id_trains_offline_and_when_the_hub_is_down(workdir, hf_home, offline, no_hub, toy_rows):
    cache_dataset(hf_home, "cpo-exp-tests/tiny_prefs", toy_rows * 2, workdir)
    offline_run, _ = trains_offline_and_with_the_hub_down(
        "data.path=cpo-exp-tests/tiny_prefs", ("data=ultrafeedback",), workdir, offline, no_hub)
    assert "train: 8 rows" in offline_run


def test_dataset_id_offline_and_not_cached_says_so(workdir, offline):
    result = run_cli("data=ultrafeedback", "tracking=none", cwd=workdir, env=offline)
    line = the_error_line(result)
    assert "data.path=trl-lib/ultrafeedback_binarized" in line and "HF_HUB_OFFLINE is set" in line
    assert "not in the local cache" in line and "local folder" in line


# --------------------------------------------------------------------------- local files


def test_missing_data_file_names_its_absolute_path_and_the_launch_dir(workdir):
    result = run_cli("data=files", "data.train_files=[nope.jsonl]", "tracking=none", cwd=workdir)
    line = the_error_line(result)
    assert "train data file not found: nope.jsonl" in line
    assert f"resolved to {workdir.resolve() / 'nope.jsonl'}" in line and f"launch dir {workdir.resolve()}" in line


# --------------------------------------------------------------------------- ALMA-R


def alma_r_row(de: str, en: str, en_outputs: tuple[str, str], de_outputs: tuple[str, str], kiwi_xcomet: dict,
               kiwi: dict, **extra) -> dict:
    """One row of haoranxu/ALMA-R-Preference's de-en config, every field of its dataset card.

    ``kiwi_xcomet``/``kiwi`` map ``<system>_<lang>`` (system ref, gpt4, alma) to that scorer's
    score; xcomet is derived so that kiwi_xcomet is the mean, as on the card.
    """
    row = {"language_pair": "de-en", "de": de, "en": en, "gpt4_en": en_outputs[0], "alma_en": en_outputs[1],
           "gpt4_de": de_outputs[0], "alma_de": de_outputs[1], "required_directions": "", "Delta": 0.0}
    for key, mean in kiwi_xcomet.items():
        row |= {f"{key}_kiwi_xcomet": mean, f"{key}_kiwi": kiwi[key], f"{key}_xcomet": 2 * mean - kiwi[key]}
    return {"translation": row | extra}


def scores(ref: float, gpt4: float, alma: float) -> dict:
    return {f"{system}_{lang}": value for system, value in (("ref", ref), ("gpt4", gpt4), ("alma", alma))
            for lang in ("en", "de")}


ALMA_ROWS = [
    # kiwi_xcomet prefers GPT-4 over the reference over ALMA; kiwi alone prefers ALMA.
    alma_r_row("das rote Auto", "the red car", ("the red automobile", "red car the"),
               ("das rote Automobil", "das Auto rot"), scores(0.8, 0.9, 0.7), scores(0.5, 0.6, 0.95)),
    alma_r_row("ein kleines Haus", "a small house", ("a little house", "small a house"),
               ("ein kleines Heim", "kleines ein Haus"), scores(0.9, 0.6, 0.5), scores(0.9, 0.6, 0.5),
               required_directions="en-de"),
]


def test_alma_r_reads_the_authors_scorer_and_prompt():
    pairs = alma_r(datasets.Dataset.from_list(ALMA_ROWS).add_column(ROW_ID, [0, 1]), "alma", ["de-en", "en-de"])
    first = pairs[0]
    assert first["prompt"] == "Translate this from German to English:\nGerman: das rote Auto\nEnglish:"
    # kiwi_xcomet, the authors' --cpo_scorer: best GPT-4, worst ALMA; the word boundary in the completion
    assert (first["chosen"], first["rejected"]) == (" the red automobile", " red car the")
    assert pairs[1]["prompt"] == "Translate this from English to German:\nEnglish: the red car\nGerman:"
    assert [p[ROW_ID] for p in pairs] == [0, 0, 1]  # the second row is for en-de only
    by_kiwi = alma_r(datasets.Dataset.from_list(ALMA_ROWS).add_column(ROW_ID, [0, 1]), "alma", ["de-en"], "kiwi")
    assert (by_kiwi[0]["chosen"], by_kiwi[0]["rejected"]) == (" red car the", " the red car")


def test_alma_r_prompt_tokens_are_a_prefix_of_prompt_and_completion():
    """With no space after the colon, tokenizing prompt + completion does not move the boundary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(locate("pkg://cpo_exp/assets/tiny_qwen2"))
    pair = alma_r(datasets.Dataset.from_list(ALMA_ROWS).add_column(ROW_ID, [0, 1]), "alma", ["de-en"])[0]
    prompt = tokenizer(pair["prompt"])["input_ids"]
    assert tokenizer(pair["prompt"] + pair["chosen"])["input_ids"][:len(prompt)] == prompt


def test_alma_r_scorer_that_names_no_score_fails_before_reading_rows():
    dataset = datasets.Dataset.from_list(ALMA_ROWS).add_column(ROW_ID, [0, 1])
    with pytest.raises(DataError) as err:
        alma_r(dataset, "alma", ["de-en"], "xcomet_kiwi")
    assert str(err.value) == ("data.adapter_args.scorer='xcomet_kiwi' names no score of alma (no "
                              "translation['ref_en_xcomet_kiwi']); its scorers: kiwi, kiwi_xcomet, xcomet")
    with pytest.raises(DataError, match=r"directions=\['cs-en'\] match no language pair of alma \(its languages: de, en\)"):
        alma_r(dataset, "alma", ["cs-en"])


def saved_alma(root: Path, copies: int = 3) -> Path:
    """A de-en config saved as ``datasets`` saves a download (``save_to_disk``)."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALMA_ROWS * copies)}).save_to_disk(root)
    return root


@pytest.mark.slow
def test_alma_r_preset_trains_on_the_real_layout(workdir):
    folder = saved_alma(workdir / "alma_r")
    result = run_cli("data=alma_r", f"data.path={folder}", "data.eval_fraction=0.25", *SHORT, cwd=workdir,
                     env={"HF_DATASETS_CACHE": str(workdir / "hf_cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 6 rows (standard)" in result.stderr and "eval: 3 rows (standard)" in result.stderr


def test_alma_r_with_a_wrong_scorer_fails_in_one_line(workdir):
    folder = saved_alma(workdir / "alma_r", copies=1)
    result = run_cli("data=alma_r", f"data.path={folder}", "data.adapter_args.scorer=xcomet_kiwi", "tracking=none",
                     cwd=workdir, env={"HF_DATASETS_CACHE": str(workdir / "hf_cache")})
    assert "its scorers: kiwi, kiwi_xcomet, xcomet" in the_error_line(result)


# --------------------------------------------------------------------------- SimPO, --help


def test_simpo_preset_uses_the_published_beta_and_margin(workdir):
    result = run_cli("loss=simpo", "--cfg", "job", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["loss"]["name"], cfg["beta"], cfg["simpo_gamma"]) == ("simpo", 2.0, 1.0)
    # Meng et al. 2024 train with beta 2-10 and gamma/beta 0.3-0.8; TRL's beta 0.1 would give 5.
    assert 0.3 <= cfg["simpo_gamma"] / cfg["beta"] <= 0.8


def test_help_describes_the_program_its_groups_and_keys(workdir):
    result = run_cli("--help", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert text.startswith("cpo_exp: preference optimisation")
    assert "loss: alphapo, dpo, hinge, ipo, orpo, sigmoid, simpo" in text and "model: hf, tiny, tiny_t5" in text
    for key in ("model.name_or_path=", "data.train_files=", "beta=", "train.learning_rate=", "tracking=none"):
        assert key in text
    assert "--cfg job" in text and "--cfg,-c : Show config" in text  # Hydra's own flags follow
