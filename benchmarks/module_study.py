"""The real end-to-end study of modules: all-MiniLM-L6-v2 fine-tuned on BBC News, as modules.

    .venv/bin/python benchmarks/module_study.py --work-dir demo-output   # reuses `posthoc demo`'s fine-tunes

`run_module_study(work_dir)` uses the demo's two fine-tunes (made, or reused from the demo's cache in the
same work directory) and:

1. extracts fine-tune A as a sparse module (density 0.05 over the whole model, LT-SFT's selection) and as
   LoRA modules of a few ranks, with fidelity reports (calibration texts: task A's validation split);
2. stacks each back onto the base and scores test accuracy on task A with fine-tune A's head, against
   the full fine-tune;
3. loads each LoRA with `peft.PeftModel.from_pretrained` and compares its head logits with those of our
   stacked checkpoint (max |difference| over the test texts, required ≤ 1e-4);
4. stacks modules of both tasks onto the base (delta, sparse, LoRA; scale 1 each, LT-SFT's composition)
   and scores both tasks, each with its own head.

Everything is written below `<work_dir>/modules/`; the table is printed and saved as results.json.
It runs longer than the demo's modules step (more ranks, calibration agreement, delta modules, a PEFT
load of each LoRA), after the demo's fine-tunes when they are not cached yet.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posthoc.data import TextClassificationData
from posthoc.demo.context import DemoSettings, demo_inputs, embed_tasks
from posthoc.demo.run import finetune_task
from posthoc.finetune import ClassificationHead
from posthoc.models import Encoder
from posthoc.modules.apply import stack
from posthoc.modules.extraction import extract


@dataclass
class StudyResult:
    single: list[dict[str, Any]]  # one row per module of fine-tune A
    both: list[dict[str, Any]]  # one row per encoder scored on both tasks
    peft: list[dict[str, Any]]  # PEFT-loaded LoRA vs our stacked checkpoint
    test_sizes: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    work_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"single": self.single, "both": self.both, "peft": self.peft, "test_sizes": self.test_sizes,
                "timings_s": {k: round(v, 1) for k, v in self.timings.items()}}

    def table(self) -> str:
        a, b = list(self.test_sizes)
        lines = [
            f"Fine-tune {a} as modules (test accuracy on task {a}, {self.test_sizes[a]} texts, fine-tune {a}'s head; "
            "fidelity against the fine-tune's change φ; agreement on 64 validation texts):",
            "",
            "| module | size (MB) | rel. error ‖φ−φ̂‖/‖φ‖ | energy kept | hidden cosine | label agreement | accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.single:
            size = "—" if r["size_mb"] is None else f"{r['size_mb']:.1f}"
            err = "—" if r["relative_error"] is None else f"{r['relative_error']:.3f}"
            energy = "—" if r["energy_kept"] is None else f"{r['energy_kept']:.3f}"
            cos = "—" if r["hidden_cosine"] is None else f"{r['hidden_cosine']:.4f}"
            agree = "—" if r["label_agreement"] is None else f"{r['label_agreement']:.3f}"
            lines.append(f"| {r['label']} | {size} | {err} | {energy} | {cos} | {agree} | {r['accuracy']:.3f} |")
        lines += ["", f"PEFT-loaded LoRA vs our stacked checkpoint (fine-tune {a}'s head logits on the {self.test_sizes[a]} test texts):", "",
                  "| LoRA | max abs logit difference | max abs embedding difference |", "|---|---|---|"]
        for r in self.peft:
            lines.append(f"| {r['label']} | {r['max_abs_logit_diff']:.2e} | {r['max_abs_embedding_diff']:.2e} |")
        lines += ["", f"Two task modules stacked on the base, θ₀ + φ_{a} + φ_{b} (each task read by its own head):", "",
                  f"| encoder | task {a} | task {b} | mean |", "|---|---|---|---|"]
        for r in self.both:
            acc = r["accuracy"]
            lines.append(f"| {r['label']} | {acc[a]:.3f} | {acc[b]:.3f} | {(acc[a] + acc[b]) / 2:.3f} |")
        return "\n".join(lines)


def run_module_study(
    work_dir: str | os.PathLike[str] = "demo-output",
    *,
    ranks: Sequence[int] = (8, 32, 128),
    density: float = 0.05,
    pair_rank: int = 32,
    base_dir: str | os.PathLike[str] | None = None,
    data: TextClassificationData | None = None,
    threads: int | None = None,
    progress: bool = True,
    fresh: bool = False,
    echo: Callable[[str], Any] | None = print,
) -> StudyResult:
    """Extract, stack, PEFT-compare and score modules of the demo's fine-tunes (see the module docstring).

    `work_dir` is the demo's work directory: its cached fine-tunes are reused when they match.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    settings = DemoSettings()
    work_dir = Path(work_dir).expanduser()
    out = work_dir / "modules"
    out.mkdir(parents=True, exist_ok=True)
    base_dir, tasks = demo_inputs(settings, base_dir, data)
    a, b = (t.name for t in settings.tasks)
    tuned = {}
    for task in settings.tasks:
        tuned[task.name], _ = finetune_task(work_dir / f"finetune-{task.name}", base_dir, task, tasks[task.name],
                                               settings, fresh, threads, progress)
    heads = {name: ClassificationHead.load(path) for name, path in tuned.items()}
    tests = {name: s.test for name, s in tasks.items()}
    calib = out / "calib.txt"
    calib.write_text("\n".join(t.replace("\n", " ") for t in tasks[a].validation.limit_per_class(22).texts[:64]) + "\n")
    timings["fine-tunes"] = time.perf_counter() - started

    # 1. Modules of fine-tune A (and of B for the pairs).
    clock = time.perf_counter()
    specs: list[tuple[str, str, dict[str, Any]]] = [(f"delta {a}", a, {"kind": "delta"}),
                                                    (f"sparse d={density} {a}", a, {"kind": "sparse", "density": density})]
    specs += [(f"lora r={r} {a}", a, {"kind": "lora", "rank": r}) for r in ranks]
    specs += [(f"delta {b}", b, {"kind": "delta"}), (f"sparse d={density} {b}", b, {"kind": "sparse", "density": density})]
    if pair_rank not in ranks:
        specs.append((f"lora r={pair_rank} {a}", a, {"kind": "lora", "rank": pair_rank}))
    specs.append((f"lora r={pair_rank} {b}", b, {"kind": "lora", "rank": pair_rank}))
    extracted: dict[str, Any] = {}
    for label, task, kwargs in specs:
        directory = out / label.replace(" ", "-").replace("=", "")
        extracted[label] = (directory, extract(base_dir, tuned[task], directory, calib=calib if task == a else None,
                                               force=True, progress=progress, tags={"task": task}, **kwargs))
    timings["extract"] = time.perf_counter() - clock

    # 2. Each module of A stacked back, scored on task A.
    clock = time.perf_counter()
    stacked: dict[str, Path] = {}
    for label, (directory, _) in extracted.items():
        stacked[label] = stack(base_dir, [directory], out / "stacked" / directory.name, force=True, progress=False).out_dir
    embeddings: dict[str, dict[str, torch.Tensor]] = {}

    def embed(key: str, encoder_dir: Path, which: Sequence[str]) -> dict[str, torch.Tensor]:
        if key not in embeddings:
            embeddings[key] = embed_tasks(Encoder.load(encoder_dir), {n: tests[n] for n in which}, settings, threads, progress)
        return embeddings[key]

    single = []
    full = embed(f"fine-tune {a}", tuned[a], [a, b])
    single.append({"label": f"full fine-tune {a}", "size_mb": None, "relative_error": None, "energy_kept": None,
                   "hidden_cosine": None, "label_agreement": None,
                   "accuracy": heads[a].accuracy(full[a], tests[a].labels)})
    for label, (_, result) in extracted.items():
        if not label.endswith(f" {a}"):
            continue
        emb = embed(label, stacked[label], [a])
        calibration = result.calibration or {}
        single.append({
            "label": label.rsplit(" ", 1)[0], "size_mb": result.stored_bytes / 1e6, "relative_error": result.relative_error,
            "energy_kept": result.energy_kept, "hidden_cosine": calibration.get("hidden_cosine_mean"),
            "label_agreement": calibration.get("label_agreement"), "accuracy": heads[a].accuracy(emb[a], tests[a].labels),
        })
    base_emb = embed("base", base_dir, [a, b])
    single.append({"label": "base (no module)", "size_mb": None, "relative_error": 1.0, "energy_kept": 0.0,
                   "hidden_cosine": None, "label_agreement": None, "accuracy": heads[a].accuracy(base_emb[a], tests[a].labels)})
    timings["stack and score"] = time.perf_counter() - clock

    # 3. PEFT loads each LoRA: same head logits as our stacked checkpoint.
    clock = time.perf_counter()
    peft_rows = []
    for label, (directory, _) in extracted.items():
        if not label.startswith("lora") or not label.endswith(f" {a}"):
            continue
        peft_emb = _embed_with_peft(base_dir, directory, tests[a], settings, threads, progress)
        ours = embed(label, stacked[label], [a])[a]
        with torch.no_grad():
            logit_diff = float((heads[a](peft_emb) - heads[a](ours)).abs().max())
        peft_rows.append({"label": label, "max_abs_logit_diff": logit_diff,
                          "max_abs_embedding_diff": float((peft_emb - ours).abs().max())})
    timings["PEFT check"] = time.perf_counter() - clock

    # 4. Both tasks' modules stacked together.
    clock = time.perf_counter()
    both = [{"label": "base", "accuracy": {n: heads[n].accuracy(base_emb[n], tests[n].labels) for n in (a, b)}}]
    for name in (a, b):
        emb = embed(f"fine-tune {name}", tuned[name], [a, b])
        both.append({"label": f"full fine-tune {name}", "accuracy": {n: heads[n].accuracy(emb[n], tests[n].labels) for n in (a, b)}})
    for kind in ("delta", f"sparse d={density}", f"lora r={pair_rank}"):
        pair = [extracted[f"{kind} {a}"][0], extracted[f"{kind} {b}"][0]]
        directory = stack(base_dir, pair, out / "stacked" / f"pair-{kind.replace(' ', '-').replace('=', '')}", force=True,
                          progress=False).out_dir
        emb = embed(f"pair {kind}", directory, [a, b])
        both.append({"label": f"{kind} {a} + {kind} {b}", "accuracy": {n: heads[n].accuracy(emb[n], tests[n].labels) for n in (a, b)}})
    timings["pairs"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started

    result = StudyResult(single, both, peft_rows, {n: len(t) for n, t in tests.items()}, timings, out)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if echo is not None:
        echo(result.table())
    return result


def _embed_with_peft(base_dir: Path, adapter: Path, data: TextClassificationData, settings: Any, threads: int | None,
                     progress: bool) -> torch.Tensor:
    """Mean-pooled embeddings of base + adapter as PEFT itself loads and runs it."""
    from peft import PeftModel

    encoder = Encoder.load(base_dir)
    encoder.model = PeftModel.from_pretrained(encoder.model, adapter).eval()
    return encoder.embed(data.texts, batch_size=settings.eval_batch_size, max_length=settings.finetune.max_length,
                         threads=threads, progress=progress)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="demo-output", help="the demo's work directory (its fine-tunes are reused)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128], help="LoRA ranks of fine-tune A's modules")
    parser.add_argument("--density", type=float, default=0.05, help="the sparse modules' density")
    parser.add_argument("--pair-rank", type=int, default=32, help="LoRA rank of the two stacked task modules")
    parser.add_argument("--threads", type=int, help="torch threads (default: every core this process may use)")
    parser.add_argument("--fresh", action="store_true", help="retrain the fine-tunes even when cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    run_module_study(args.work_dir, ranks=args.ranks, density=args.density, pair_rank=args.pair_rank,
                     threads=args.threads, progress=not args.quiet, fresh=args.fresh)


if __name__ == "__main__":
    main()
