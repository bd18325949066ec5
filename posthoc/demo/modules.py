"""The demo's modules step: both fine-tunes as portable modules, stacked together, scored on both tasks.

After the merge table, `posthoc demo` shows the other way to combine the two fine-tunes: each is turned
into a module of the base with `posthoc extract` — LT-SFT's sparse selection (the 5 % largest |Δ| of the
whole model) and a LoRA (truncated SVD of each matrix's Δ, rank 32) — and the modules of both tasks are
stacked onto the base with `posthoc stack`, θ = θ₀ + φ_A + φ_B (LT-SFT's additive composition: scale 1
each, no λ to pick). The stacked encoders are scored on the test split of both tasks, each task read by
its own fine-tuned head, exactly like the merged encoders in the table above.

Everything lives in `<work_dir>/modules/`: the four modules (kept: they are the shareable artefacts) and
`demo_step.json`, the record that holds the scores and the key they were made with (fine-tune run ids,
density, rank, test texts). The stacked encoders are scored in a temporary directory and removed (one
`posthoc stack` remakes them). A second run with the same key reuses everything; `fresh` redoes it all.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from posthoc.checkpoint import open_checkpoint
from posthoc.data import TextClassificationData
from posthoc.demo.context import DemoContext, data_digest, embed_tasks
from posthoc.finetune import read_record
from posthoc.models import Encoder
from posthoc.modules.apply import stack
from posthoc.modules.extraction import extract

DENSITY = 0.05  # LT-SFT's sparse selection, as in the proof
RANK = 32  # the LoRA's rank on all-MiniLM-L6-v2 (hidden 384); smaller bases get a quarter of their width
RECORD = "demo_step.json"


def demo_rank(base_dir: Path) -> int:
    """RANK, or a quarter of the base's widest matrix side when that is smaller (tiny test models), so that
    the factors are smaller than the matrices they stand for."""
    with open_checkpoint(base_dir) as base:
        sides = [min(i.shape) for i in base.tensors.values() if len(i.shape) == 2 and i.dtype.is_floating_point]
    return max(1, min(RANK, max(sides, default=4) // 4))


def demo_step(context: DemoContext) -> str:
    """Extract, stack and score the modules of the demo's fine-tunes; the text block the demo prints."""
    settings = context.settings
    names = [task.name for task in settings.tasks]
    root = context.work_dir / "modules"
    rank = demo_rank(context.base_dir)
    tests = {name: context.splits[name].test.limit_per_class(settings.test_per_class) for name in names}
    kinds = {"sparse": {"kind": "sparse", "density": DENSITY}, "lora": {"kind": "lora", "rank": rank}}
    directories = {(kind, name): root / f"{kind}-{name}" for kind in kinds for name in names}
    key = {
        "base_model": str(context.base_dir.resolve()),
        "fine-tunes": {name: (read_record(context.finetuned[name]) or {}).get("run_id") for name in names},
        "modules": kinds,
        "test": {name: data_digest(t) for name, t in tests.items()},
        "max_length": settings.finetune.max_length,
    }
    record_path = root / RECORD
    if not context.fresh and record_path.is_file() and all((d / "module.json").is_file() for d in directories.values()):
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            return _table(record["rows"], names, record["timings"], {n: len(t) for n, t in tests.items()}, cached=True)

    root.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    extracted: dict[tuple[str, str], Any] = {}
    for (kind, name), directory in directories.items():
        extracted[kind, name] = extract(
            context.base_dir, context.finetuned[name], directory, **kinds[kind], force=True, progress=context.progress,
            tags={"task": name, "made_by": "posthoc demo"},
        )
    timings["extract"] = time.perf_counter() - clock

    clock = time.perf_counter()
    rows = _stack_and_score(context, root, kinds, directories, extracted, tests)
    timings["stack and score"] = time.perf_counter() - clock
    full_mb = next(iter(extracted.values())).base_bytes / 1e6
    for row in rows:
        row["full_mb"] = full_mb
    record_path.write_text(json.dumps({"key": key, "rows": rows, "timings": timings}, indent=2) + "\n")
    return _table(rows, names, timings, {n: len(t) for n, t in tests.items()}, cached=False)


def _stack_and_score(
    context: DemoContext,
    root: Path,
    kinds: dict[str, dict[str, Any]],
    directories: dict[tuple[str, str], Path],
    extracted: dict[tuple[str, str], Any],
    tests: dict[str, TextClassificationData],
) -> list[dict[str, Any]]:
    """One row per module kind: both tasks' modules stacked onto the base (in a scratch directory, removed
    after), scored on both tasks with the fine-tuned heads; sizes and energy kept from the extractions."""
    names = list(tests)
    rows: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix=".stacked-", dir=root))
    try:
        for kind in kinds:
            stacked = stack(context.base_dir, [directories[kind, n] for n in names], scratch / kind, progress=False)
            embeddings = embed_tasks(Encoder.load(stacked.out_dir), tests, context.settings, context.threads,
                                     context.progress)  # fmt: skip
            rows.append({
                "kind": kind,
                "label": f"sparse d={DENSITY}" if kind == "sparse" else f"LoRA r={kinds['lora']['rank']}",
                "size_mb": {n: extracted[kind, n].stored_bytes / 1e6 for n in names},
                "energy_kept": {n: extracted[kind, n].energy_kept for n in names},
                "accuracy": {n: context.heads[n].accuracy(embeddings[n], tests[n].labels) for n in names},
            })
            shutil.rmtree(stacked.out_dir, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _table(rows: list[dict[str, Any]], names: list[str], timings: dict[str, float], sizes: dict[str, int],
           cached: bool) -> str:
    a, b = names
    caption = (
        f"Modules: each fine-tune extracted as a module of the base (posthoc extract), the modules of both tasks "
        f"stacked onto it, θ₀ + φ_{a} + φ_{b} (posthoc stack, scale 1 each, no λ to pick). Test accuracy on "
        f"{sizes[a]} + {sizes[b]} texts with the fine-tuned heads, as above. Energy kept: the share of "
        f"‖θ_tuned − θ_base‖² the module reproduces; a whole fine-tune is {rows[0]['full_mb']:.1f} MB."
    )
    lines = [*textwrap.wrap(caption, 100), ""]
    header = f"{'modules ' + a + ' + ' + b:<20}{'MB ' + a + ' + ' + b:>16}{'energy kept':>14}{'task ' + a:>8}{'task ' + b:>8}{'mean':>8}"
    lines += [header, "-" * len(header)]
    for r in rows:
        size = f"{r['size_mb'][a]:.1f} + {r['size_mb'][b]:.1f}"
        energy = f"{r['energy_kept'][a]:.2f} / {r['energy_kept'][b]:.2f}"
        acc = r["accuracy"]
        lines.append(f"{r['label']:<20}{size:>16}{energy:>14}{acc[a]:>8.3f}{acc[b]:>8.3f}{(acc[a] + acc[b]) / 2:>8.3f}")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + (" (cached)" if cached else "")
    lines += ["", f"time: {timing}"]
    return "\n".join(lines)
