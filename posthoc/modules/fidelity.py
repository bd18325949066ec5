"""How faithful a module is: per-tensor figures, agreement on calibration text, and the HTML report.

Per tensor: the relative Frobenius error ‖φ − φ̂‖ / ‖φ‖ of what the module stores (φ̂) against the change
it was made from (φ), and the energy kept, 1 − error² (the share of ‖φ‖² reproduced). On calibration
texts: the model with the module applied against the fine-tune it came from — the cosine of their final
hidden states (per token, and of the mean-pooled sentence embeddings) and, for a classifier, how often
they predict the same label (a posthoc task head next to the fine-tune, or the model's own logits).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from posthoc.errors import DataError
from posthoc.finetune import ClassificationHead
from posthoc.models import load_model, mean_pool
from posthoc.report import Report


@dataclass
class TensorFidelity:
    name: str
    shape: list[int]
    storage: str  # dense | sparse | lora
    norm: float  # ‖φ‖ of the change it was made from
    relative_error: float
    rank: int | None = None
    nnz: int | None = None

    @property
    def energy_kept(self) -> float:
        return max(0.0, 1.0 - self.relative_error**2)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "energy_kept": self.energy_kept}


def overall_error(records: Sequence[TensorFidelity]) -> float:
    """‖φ − φ̂‖ / ‖φ‖ over the whole model (the per-tensor errors weighted by their norms)."""
    total = sum(r.norm**2 for r in records)
    if total == 0:
        return 0.0
    return (sum((r.relative_error * r.norm) ** 2 for r in records) / total) ** 0.5


def read_texts(path: str | os.PathLike[str], limit: int) -> list[str]:
    """Calibration texts: one per non-empty line of a UTF-8 file, at most `limit`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such calibration file (one text per line)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read calibration texts ({error})") from None
    texts = [line.strip() for line in lines if line.strip()][:limit]
    if not texts:
        raise DataError(f"{path}: no calibration texts (one text per non-empty line)")
    return texts


@torch.inference_mode()
def calibration_agreement(
    reference_dir: str | os.PathLike[str],
    candidate_dir: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Agreement of `candidate_dir` (base + module) with `reference_dir` (the fine-tune) on `texts`."""
    import transformers

    reference_dir, candidate_dir = Path(reference_dir), Path(candidate_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir or reference_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    head = ClassificationHead.load(reference_dir) if (reference_dir / "head.json").is_file() else None
    models = [load_model(d, with_tokenizer=False)[0] for d in (reference_dir, candidate_dir)]
    token_cos, pooled_cos, agree, count = [], [], 0, 0
    label_source = "posthoc task head" if head is not None else None
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
        outs = [m(**batch, output_hidden_states=True) for m in models]
        hidden = [o.hidden_states[-1].float() for o in outs]  # (batch, tokens, hidden)
        mask = batch["attention_mask"].bool()
        token_cos.append(torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=-1)[mask])
        pooled = [mean_pool(h, batch["attention_mask"]) for h in hidden]
        pooled_cos.append(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=-1))
        if head is not None:
            labels = [head.predict(p) for p in pooled]
            agree += int((labels[0] == labels[1]).sum())
            count += labels[0].numel()
        elif getattr(outs[0], "logits", None) is not None:
            logits = [o.logits for o in outs]
            if logits[0].dim() == 2:  # (batch, classes): a sequence classifier
                label_source = "model logits (per text)"
                labels = [lg.argmax(-1) for lg in logits]
            else:  # (batch, tokens, vocab): next-token predictions on real tokens
                label_source = "model logits (next token)"
                labels = [lg.argmax(-1)[mask] for lg in logits]
            agree += int((labels[0] == labels[1]).sum())
            count += labels[0].numel()
    tokens, pooled_all = torch.cat(token_cos), torch.cat(pooled_cos)
    return {
        "texts": len(texts),
        "max_length": max_length,
        "hidden_cosine_mean": float(tokens.mean()),
        "hidden_cosine_min": float(tokens.min()),
        "pooled_cosine_mean": float(pooled_all.mean()),
        "pooled_cosine_min": float(pooled_all.min()),
        "label_agreement": agree / count if count else None,
        "label_source": label_source,
    }


def write_report(
    directory: Path,
    *,
    title: str,
    subtitle: str,
    summary: dict[str, Any],
    records: Sequence[TensorFidelity],
    calibration: dict[str, Any] | None,
) -> Path:
    """report.html + a PNG of the per-tensor energy kept, next to the module's files."""
    report = Report(title, subtitle)
    report.section("Summary")
    report.key_values(summary)
    if calibration is not None:
        report.section("Agreement with the fine-tune on calibration text")
        report.key_values(calibration)
    if records:
        report.section("Per tensor", "Relative Frobenius error ‖φ − φ̂‖/‖φ‖ and energy kept 1 − error², worst first.")
        worst = sorted(records, key=lambda r: -r.relative_error)
        rows = [
            [r.name, "×".join(map(str, r.shape)), r.storage, r.rank if r.rank is not None else "",
             r.nnz if r.nnz is not None else "", r.norm, r.relative_error, r.energy_kept]
            for r in worst[:60]
        ]
        more = f" ({len(records) - 60} more in fidelity.json)" if len(records) > 60 else ""
        report.table(["tensor", "shape", "storage", "rank", "kept entries", "‖φ‖", "rel. error", "energy kept"], rows,
                     caption=f"{len(records)} changed tensors{more}", floatfmt=".4g")
        fig, ax = report.figure_axes(height=3.0)
        ax.bar(range(len(records)), [r.energy_kept for r in records], width=1.0, color="#3b6ea5")
        ax.set_xlabel("changed tensor (checkpoint order)")
        ax.set_ylabel("energy kept")
        ax.set_ylim(0, 1.02)
        report.figure(fig, "energy_kept", "Energy kept per tensor, in checkpoint order (embeddings first).")
    return report.write(directory)
