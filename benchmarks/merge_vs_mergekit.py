#!/usr/bin/env python3
"""Benchmark ``posthoc merge`` against ``mergekit-yaml`` on a synthetic Llama job.

What it does
------------
1. Builds (once, cached under the work dir) a synthetic ~270 M parameter
   ``LlamaForCausalLM`` in bfloat16, saved with transformers'
   ``save_pretrained`` in 200 MB shards, plus three "fine-tunes" that are the
   base plus small Gaussian noise (``--noise-rel`` times each tensor's RMS,
   different seeds).
2. Installs mergekit into its own virtualenv (``<workdir>/mergekit-venv``) if it
   is missing. See ``ensure_mergekit`` for the exact pip commands.
3. For each merge method writes one mergekit YAML and runs ``mergekit-yaml`` and
   ``posthoc merge --force`` on that very same YAML, each as a child process
   reaped with ``os.wait4`` to get its own wall time and peak RSS
   (``ru_maxrss``).
4. For deterministic methods compares the two outputs tensor by tensor.
5. Prints tables and writes ``<workdir>/results.json``.

Measurement caveat (why this orchestrator stays small)
------------------------------------------------------
On Linux a child's ``ru_maxrss`` starts at its *parent's* peak RSS: Python's
``subprocess`` uses vfork/fork, and ``exec`` folds the old address space's
high-water mark into the child's ``maxrss``. If this process imported torch or
built the models itself, every measured tool would report at least that much.
So the orchestrator only uses the standard library; building the models,
comparing outputs and timing ``import torch`` all run in child processes
(``--worker`` mode of this same file). The orchestrator's own peak RSS is
printed as the floor under every RSS figure.

Reading the numbers
-------------------
* Both tools get OMP_NUM_THREADS/MKL_NUM_THREADS = ``--threads`` (default 2);
  mergekit also gets ``-j N`` (its only effect: ``torch.set_num_threads``).
  Otherwise default flags (no ``--cuda``; ``--lazy-unpickle`` only matters for
  pickled ``.bin`` inputs, and these are safetensors).
* Wall time is the best of ``--repeat`` runs; user+sys CPU time is printed too
  because it is less sensitive to other work on the machine. The 1-minute load
  average before each run is printed, with a warning above ``LOAD_WARN``.
* The synthetic models ship a trivial word-level tokenizer: without one,
  mergekit spends ~3 s in a failing attempt to load/copy a tokenizer.
* With the default ``--noise-rel 1e-3`` only ~22% of the bf16 elements of a
  fine-tune differ from the base (the rest of the noise is below half an
  ulp), and the deltas are quantized, so many have equal magnitudes: at TIES'
  density cut-off the choice among equal magnitudes is up to the
  implementation (mergekit uses an unstable ``argsort``).
* "> 1 bf16 ulp" counts elements whose difference exceeds one bf16 ulp of
  max(|mergekit|, |posthoc|); near-zero values from cancellation have tiny
  ulps, so this count is dominated by them. With ``dtype: bfloat16`` mergekit
  0.1.5 does its task-vector arithmetic (task_arithmetic, ties, dare_ties) in
  bfloat16, weights included (0.3 becomes 0.30078125), so an implementation
  that computes in float32 and rounds once differs from it by an ulp here and
  there.

Usage::

    .venv/bin/python benchmarks/merge_vs_mergekit.py
    .venv/bin/python benchmarks/merge_vs_mergekit.py --methods ties,slerp --repeat 3
    .venv/bin/python benchmarks/merge_vs_mergekit.py --skip-mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only the worker processes import torch
    import torch

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / ".work"

MERGEKIT_VERSION = "0.1.5"
# A bare ``torch`` requirement would pull a multi-GB CUDA build here; this exact
# version resolves to the CPU wheel that lies on local disk.
TORCH_PIN = "torch==2.13.0"

# `*_f32` jobs: the same merge with `dtype: float32, out_dtype: bfloat16`, so that mergekit also does its
# arithmetic in float32 (with `dtype: bfloat16` it computes task vectors, weights included, in bf16).
ALL_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "task_arithmetic_f32", "ties_f32")
DETERMINISTIC = frozenset({"linear", "task_arithmetic", "ties", "slerp", "task_arithmetic_f32", "ties_f32"})
N_FINETUNES = 3

# Synthetic model: ~271 M parameters (32000*1024*2 + 16 * 12.85 M).
MODEL_SPEC: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
INIT_STD = 0.02
MAX_SHARD_SIZE = "200MB"
BASE_SEED = 1234
LOAD_WARN = 0.5  # warn when the 1-minute load average before a timed run is above this


# --------------------------------------------------------------------------- #
# Small helpers (standard library only)
# --------------------------------------------------------------------------- #


@dataclass
class RunResult:
    """One measured child process."""

    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # user + sys CPU seconds: less sensitive than wall time to other load on the machine
    maxrss_gb: float
    load_before: float  # 1-minute load average just before the run (other work on the machine)
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class ToolJob:
    """All runs of one tool on one job."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    @property
    def wall_s(self) -> float | None:
        """Best (minimum) wall time over the successful runs."""
        ok = [r.wall_s for r in self.runs if r.ok]
        return min(ok) if ok else None

    @property
    def cpu_s(self) -> float | None:
        """Least CPU time (user + sys) over the successful runs."""
        ok = [r.cpu_s for r in self.runs if r.ok]
        return min(ok) if ok else None

    @property
    def maxrss_gb(self) -> float | None:
        """Largest peak RSS over the successful runs."""
        ok = [r.maxrss_gb for r in self.runs if r.ok]
        return max(ok) if ok else None

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "maxrss_gb": self.maxrss_gb,
            "runs": [asdict(r) for r in self.runs],
        }


def log(msg: str) -> None:
    print(msg, flush=True)


def self_maxrss_gb() -> float:
    """Peak RSS of this orchestrator process (the floor of every child's figure)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child_env(threads: int) -> dict[str, str]:
    """Environment for every measured child: fixed thread count, no hub access."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_measured(argv: list[str], log_path: Path, env: dict[str, str]) -> RunResult:
    """Run ``argv`` with Popen, reap it with os.wait4; return its wall time, CPU time and peak RSS."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it has been reaped
    cpu = usage.ru_utime + usage.ru_stime
    # Linux reports ru_maxrss in KiB.
    return RunResult(argv, proc.returncode, wall, cpu, usage.ru_maxrss / 1024**2, load, str(log_path))


def tail(path: str | Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in lines[-n:])


def run_worker(
    task: str, params: dict[str, Any], python: str, env: dict[str, str], log_path: Path
) -> dict[str, Any]:
    """Run ``task`` of this file in a child process (keeps the orchestrator small)."""
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    argv = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        task,
        "--worker-params",
        json.dumps(params),
        "--worker-out",
        str(result_path),
    ]
    res = run_measured(argv, log_path, env)
    if not res.ok:
        raise RuntimeError(
            f"worker {task!r} failed (exit {res.returncode}); log {log_path}:\n{tail(log_path)}"
        )
    data = json.loads(result_path.read_text())
    data["_wall_s"] = res.wall_s
    data["_maxrss_gb"] = res.maxrss_gb
    return data


# --------------------------------------------------------------------------- #
# Worker side: synthetic models (imports torch / transformers)
# --------------------------------------------------------------------------- #


def param_shapes(spec: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LlamaForCausalLM with ``spec`` (untied lm_head)."""
    h, i, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    head_dim = h // spec["num_attention_heads"]
    kv = spec["num_key_value_heads"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(spec["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def make_base_state(spec: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Base weights: N(0, INIT_STD) matrices, norms = 1, all bfloat16."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(spec):
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(shape, generator=gen) * INIT_STD).to(torch.bfloat16)
    return state


def make_finetune_state(
    base: dict[str, torch.Tensor], seed: int, noise_rel: float
) -> dict[str, torch.Tensor]:
    """Base + Gaussian noise of std ``noise_rel * rms(tensor)``, computed in float32, stored bfloat16."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, w in base.items():
        w32 = w.float()
        rms = w32.pow(2).mean().sqrt()
        state[name] = (w32 + torch.randn(w.shape, generator=gen) * (noise_rel * rms)).to(torch.bfloat16)
    return state


def save_model(state: dict[str, torch.Tensor], spec: dict[str, Any], out_dir: Path) -> None:
    """Save ``state`` with transformers' save_pretrained (sharded), without a slow random init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)
    make_tokenizer(spec["vocab_size"]).save_pretrained(out_dir)


def make_tokenizer(vocab_size: int) -> Any:
    """A trivial word-level fast tokenizer covering the vocab, so that the job looks like a real
    checkpoint (mergekit copies the base model's tokenizer; without one it logs a failed load)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def worker_build(params: dict[str, Any]) -> dict[str, Any]:
    """Build base + fine-tunes into params['models_dir'] and check they load."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(params["threads"])
    models_dir = Path(params["models_dir"])
    spec, noise_rel = params["spec"], params["noise_rel"]
    models_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = make_base_state(spec, BASE_SEED)
    n_params = sum(t.numel() for t in base.values())
    save_model(base, spec, models_dir / "base")
    print(f"base: {n_params / 1e6:.1f} M params, {time.perf_counter() - t0:.1f} s", flush=True)
    changed: dict[str, float] = {}
    for k in range(1, N_FINETUNES + 1):
        ft = make_finetune_state(base, BASE_SEED + 1000 * k, noise_rel)
        n_changed = sum(int((ft[n] != base[n]).sum()) for n in base)
        changed[f"ft{k}"] = n_changed / n_params
        save_model(ft, spec, models_dir / f"ft{k}")
        print(
            f"ft{k}: {changed[f'ft{k}']:.1%} of elements differ from base, {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        del ft
    # The outputs must load with AutoModelForCausalLM.
    model = AutoModelForCausalLM.from_pretrained(models_dir / "ft1", dtype=torch.bfloat16)
    loaded = sum(p.numel() for p in model.parameters())
    assert loaded == n_params, (loaded, n_params)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    return {"n_params": n_params, "changed_fraction": changed, "build_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- #
# Worker side: output comparison
# --------------------------------------------------------------------------- #


def tensor_locations(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, via model.safetensors.index.json or the single file(s)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {model_dir}")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[name] = f
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bfloat16 ulp at |x| (float32 input): 2**(floor(log2|x|) - 7), floored at the smallest subnormal."""
    import torch

    _, exp = torch.frexp(x.abs())  # |x| = m * 2**exp, m in [0.5, 1); frexp(0) gives exp 0
    exp = torch.where(x == 0, -125, exp)  # so that 0 gets the subnormal ulp 2**-133 too
    return torch.ldexp(torch.ones_like(x), (exp - 8).clamp(min=-133))


def worker_compare(params: dict[str, Any]) -> dict[str, Any]:
    """Compare two merge outputs tensor by tensor in float32."""
    import torch
    from safetensors import safe_open

    torch.set_num_threads(params["threads"])
    ref_dir, new_dir = Path(params["reference"]), Path(params["candidate"])
    ref_loc, new_loc = tensor_locations(ref_dir), tensor_locations(new_dir)
    common = sorted(set(ref_loc) & set(new_loc))
    result: dict[str, Any] = {
        "only_in_reference": sorted(set(ref_loc) - set(new_loc)),
        "only_in_candidate": sorted(set(new_loc) - set(ref_loc)),
        "shape_mismatch": [],
        "dtypes_reference": [],
        "dtypes_candidate": [],
        "n_tensors": len(common),
        "n_elements": 0,
        "n_over_1ulp": 0,
        "max_abs_diff": 0.0,
        "max_rel_diff": 0.0,
        "worst_tensor": None,
        "worst_abs_element": None,
        "max_ulps": 0.0,  # largest |diff| in bf16 ulps of max(|reference|, |candidate|)
        "worst_ulp_element": None,
        "n_nan_mismatch": 0,
        "n_tensors_identical": 0,
        "per_tensor": {},  # only tensors that differ
    }
    dtypes_ref: set[str] = set()
    dtypes_new: set[str] = set()
    handles: dict[Path, Any] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for name in common:
        a_raw, b_raw = get(ref_loc[name], name), get(new_loc[name], name)
        dtypes_ref.add(str(a_raw.dtype))
        dtypes_new.add(str(b_raw.dtype))
        if a_raw.shape != b_raw.shape:
            result["shape_mismatch"].append([name, list(a_raw.shape), list(b_raw.shape)])
            continue
        a, b = a_raw.float(), b_raw.float()
        del a_raw, b_raw
        if not a.numel():
            continue
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        diff = (a - b).abs()
        diff = torch.where(nan_a & nan_b, 0.0, diff)  # NaN in both: equal
        diff = torch.where(nan_a ^ nan_b, float("inf"), diff)  # NaN in one only: infinitely different
        ulps = diff / bf16_ulp(torch.maximum(a.abs(), b.abs()).nan_to_num(0.0))
        max_diff = float(diff.max())
        scale = float(a.abs().nan_to_num(0.0).max())
        rel = max_diff / scale if scale > 0 else (0.0 if max_diff == 0 else float("inf"))
        over = int((ulps > 1).sum())
        result["n_elements"] += a.numel()
        result["n_over_1ulp"] += over
        result["n_nan_mismatch"] += int((nan_a ^ nan_b).sum())
        result["n_tensors_identical"] += int(max_diff == 0.0)
        result["max_rel_diff"] = max(result["max_rel_diff"], rel)
        if max_diff > 0:
            result["per_tensor"][name] = {"max_abs_diff": max_diff, "max_rel_diff": rel, "n_over_1ulp": over}
        if max_diff > result["max_abs_diff"]:
            i = int(diff.argmax())
            result["max_abs_diff"] = max_diff
            result["worst_tensor"] = name
            result["worst_abs_element"] = {
                "tensor": name,
                "flat_index": i,
                "reference": float(a.view(-1)[i]),
                "candidate": float(b.view(-1)[i]),
            }
        max_ulps = float(ulps.max())
        if max_ulps > result["max_ulps"]:
            i = int(ulps.argmax())
            result["max_ulps"] = max_ulps
            result["worst_ulp_element"] = {
                "tensor": name,
                "flat_index": i,
                "reference": float(a.view(-1)[i]),
                "candidate": float(b.view(-1)[i]),
                "ulps": max_ulps,
            }
    result["dtypes_reference"] = sorted(dtypes_ref)
    result["dtypes_candidate"] = sorted(dtypes_new)
    return result


WORKERS = {"build": worker_build, "compare": worker_compare}


# --------------------------------------------------------------------------- #
# Orchestrator side (standard library only)
# --------------------------------------------------------------------------- #


def build_spec(noise_rel: float) -> dict[str, Any]:
    """Everything that determines the synthetic models (the cache key)."""
    return {
        "spec": MODEL_SPEC,
        "init_std": INIT_STD,
        "noise_rel": noise_rel,
        "base_seed": BASE_SEED,
        "n_finetunes": N_FINETUNES,
        "max_shard_size": MAX_SHARD_SIZE,
        "format": 2,
    }


def models_valid(models_dir: Path, key: dict[str, Any]) -> bool:
    """The cache is valid if the marker matches ``key`` and every model's files are all there."""
    marker = models_dir / "build.json"
    try:
        if json.loads(marker.read_text()).get("key") != key:
            return False
    except (OSError, ValueError):
        return False
    for name in ["base"] + [f"ft{k}" for k in range(1, N_FINETUNES + 1)]:
        d = models_dir / name
        index = d / "model.safetensors.index.json"
        if not all((d / f).is_file() for f in ("config.json", "tokenizer.json")) or not index.is_file():
            return False
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        if not shards or any(not (d / s).is_file() or (d / s).stat().st_size == 0 for s in shards):
            return False
    return True


def ensure_models(workdir: Path, noise_rel: float, threads: int, rebuild: bool) -> dict[str, Any]:
    models_dir = workdir / "models"
    key = build_spec(noise_rel)
    if not rebuild and models_valid(models_dir, key):
        info = json.loads((models_dir / "build.json").read_text())
        log(f"models: cached in {models_dir}")
        return info
    log(f"models: building base + {N_FINETUNES} fine-tunes in {models_dir} (about a minute) ...")
    (models_dir / "build.json").unlink(missing_ok=True)
    params = {"models_dir": str(models_dir), "spec": MODEL_SPEC, "noise_rel": noise_rel, "threads": threads}
    info = run_worker("build", params, sys.executable, child_env(threads), workdir / "logs" / "build.log")
    info = {"key": key, **{k: v for k, v in info.items() if not k.startswith("_")}}
    (models_dir / "build.json").write_text(json.dumps(info, indent=2))
    log(
        f"models: built in {info['build_s']:.1f} s, {info['n_params'] / 1e6:.1f} M params; fraction of "
        f"elements differing from base: "
        + ", ".join(f"{k} {v:.1%}" for k, v in info["changed_fraction"].items())
    )
    return info


def ensure_mergekit(venv: Path, log_path: Path) -> Path:
    """Install mergekit into ``venv`` if needed; return its ``mergekit-yaml``.

    Commands (this is what worked on this machine, python 3.11)::

        python -m venv <venv>
        <venv>/bin/pip install torch==2.13.0
        <venv>/bin/pip install mergekit==0.1.5 torch==2.13.0

    torch goes first and stays pinned in the second command, so that pip keeps
    the local CPU wheel instead of fetching a CUDA build. mergekit 0.1.5's pins
    (transformers>=5,<6, accelerate>=1.6, peft>=0.18, safetensors<1, ...) then
    resolve cleanly (transformers 5.24.0); no further overrides were needed.
    """
    exe = venv / "bin" / "mergekit-yaml"
    python = venv / "bin" / "python"
    if exe.exists() and python.exists():
        check = subprocess.run(
            [str(python), "-c", "import mergekit, torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
        )
        if check.returncode == 0:
            return exe
    log(f"mergekit: installing mergekit=={MERGEKIT_VERSION} into {venv} (a few minutes; log {log_path}) ...")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "pip"), "install", TORCH_PIN],
        [str(venv / "bin" / "pip"), "install", f"mergekit=={MERGEKIT_VERSION}", TORCH_PIN],
    ]
    with open(log_path, "w") as out:
        for argv in steps:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"mergekit install failed at: {' '.join(argv)}\n{tail(log_path)}")
    if not exe.exists():
        raise RuntimeError(f"mergekit installed but {exe} is missing")
    return exe


def find_posthoc(explicit: str | None) -> list[str] | None:
    """The posthoc command: --posthoc, else next to this interpreter, else on PATH."""
    if explicit:
        return explicit.split()
    candidate = Path(sys.executable).parent / "posthoc"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("posthoc")
    return [found] if found else None


def posthoc_problem(posthoc: list[str], env: dict[str, str]) -> str | None:
    """Why ``posthoc merge`` cannot be used, or None if ``posthoc merge --help`` succeeds."""
    try:
        check = subprocess.run([*posthoc, "merge", "--help"], capture_output=True, text=True, env=env)
    except OSError as e:
        return f"cannot run {' '.join(posthoc)!r}: {e}"
    if check.returncode != 0:
        out = (check.stderr or check.stdout).strip()[-1500:]
        return f"`{' '.join(posthoc)} merge --help` failed (exit {check.returncode}):\n{out}"
    return None


def method_config(method: str, models_dir: Path) -> dict[str, Any]:
    """The mergekit YAML (as a dict) for one method."""
    if method.endswith("_f32"):
        return {**method_config(method.removesuffix("_f32"), models_dir), "dtype": "float32", "out_dtype": "bfloat16"}
    base = str(models_dir / "base")
    fts = [str(models_dir / f"ft{k}") for k in range(1, N_FINETUNES + 1)]
    if method == "linear":
        models = [{"model": m, "parameters": {"weight": 1.0}} for m in [base, *fts]]
        return {"merge_method": "linear", "models": models, "dtype": "bfloat16"}
    if method == "task_arithmetic":
        models = [{"model": m, "parameters": {"weight": 0.3}} for m in fts]
        return {"merge_method": "task_arithmetic", "base_model": base, "models": models, "dtype": "bfloat16"}
    if method in ("ties", "dare_ties"):
        models = [{"model": m, "parameters": {"density": 0.2, "weight": 0.5}} for m in fts]
        return {"merge_method": method, "base_model": base, "models": models, "dtype": "bfloat16"}
    if method == "slerp":
        # mergekit's slerp takes exactly two models, one of which is base_model.
        return {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": fts[0]}],
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
        }
    raise ValueError(f"unknown method {method}")


def to_yaml(obj: Any, indent: int = 0) -> str:
    """Tiny YAML emitter for the config dicts above (keeps the orchestrator dependency-free)."""
    pad = "  " * indent
    if isinstance(obj, dict):
        lines = []
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                lines.append(f"{pad}{k}:\n{to_yaml(v, indent + 1)}")
            else:
                lines.append(f"{pad}{k}: {json.dumps(v)}")
        return "\n".join(lines)
    if isinstance(obj, list):
        lines = []
        for item in obj:
            body = to_yaml(item, indent + 1).lstrip() if isinstance(item, (dict, list)) else json.dumps(item)
            lines.append(f"{pad}- {body}")
        return "\n".join(lines)
    return pad + json.dumps(obj)


def run_tool(
    name: str, argv: list[str], out_dir: Path, log_dir: Path, method: str, repeat: int, env: dict[str, str]
) -> ToolJob:
    job = ToolJob()
    for i in range(repeat):
        if out_dir.exists():
            shutil.rmtree(out_dir)
        res = run_measured(argv, log_dir / f"{method}-{name}-{i}.log", env)
        job.runs.append(res)
        status = "ok" if res.ok else f"FAILED (exit {res.returncode})"
        log(
            f"  {name:8s} run {i + 1}/{repeat}: {res.wall_s:7.1f} s wall, {res.cpu_s:7.1f} s CPU, "
            f"peak RSS {res.maxrss_gb:5.2f} GB, load before {res.load_before:4.2f}  {status}"
        )
        if res.load_before > LOAD_WARN:
            log(f"  WARNING: 1-min load average was {res.load_before:.2f}: other work may skew wall times")
        if not res.ok:
            log(f"  {name} log tail ({res.log}):\n{tail(res.log)}")
            break
    return job


def time_startup(argv: list[str], log_path: Path, env: dict[str, str]) -> dict[str, Any]:
    res = run_measured(argv, log_path, env)
    return {"argv": argv, "ok": res.ok, "wall_s": res.wall_s, "maxrss_gb": res.maxrss_gb, "log": res.log}


def import_torch_time(python: str, env: dict[str, str]) -> dict[str, Any]:
    """Time `import torch` in a fresh interpreter, twice (the first may hit a cold page cache)."""
    code = (
        "import time; t = time.perf_counter(); import torch; "
        "print(f'{time.perf_counter() - t:.4f} {torch.__version__}')"
    )
    times = []
    version = "?"
    for _ in range(2):
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"python": python, "error": proc.stderr[-500:]}
        secs, version = proc.stdout.split()
        times.append(float(secs))
    return {"python": python, "torch": version, "first_s": times[0], "second_s": times[1]}


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def print_job_table(method: str, mk: ToolJob | None, ph: ToolJob | None, cmp: dict[str, Any] | None) -> None:
    mk_wall, ph_wall = (mk.wall_s if mk else None), (ph.wall_s if ph else None)
    mk_cpu, ph_cpu = (mk.cpu_s if mk else None), (ph.cpu_s if ph else None)
    mk_rss, ph_rss = (mk.maxrss_gb if mk else None), (ph.maxrss_gb if ph else None)
    log(f"\n=== {method} ===")
    log(f"  {'':16s}{'mergekit':>10s}{'posthoc':>10s}{'ph/mk':>9s}")
    log(f"  {'wall s':16s}{fmt(mk_wall):>10s}{fmt(ph_wall):>10s}{fmt(ratio(ph_wall, mk_wall)):>9s}")
    log(f"  {'CPU s (usr+sys)':16s}{fmt(mk_cpu):>10s}{fmt(ph_cpu):>10s}{fmt(ratio(ph_cpu, mk_cpu)):>9s}")
    log(f"  {'peak RSS GB':16s}{fmt(mk_rss):>10s}{fmt(ph_rss):>10s}{fmt(ratio(ph_rss, mk_rss)):>9s}")
    if cmp is None:
        return
    if "error" in cmp:
        log(f"  comparison failed: {cmp['error']}")
        return
    log(
        f"  outputs: {cmp['n_tensors']} common tensors ({cmp['n_tensors_identical']} bit-identical), "
        f"dtypes mergekit {cmp['dtypes_reference']} posthoc {cmp['dtypes_candidate']}"
    )
    log(
        f"  max |diff| {cmp['max_abs_diff']:.3e} (in {cmp['worst_tensor']}), max |diff|/max|t| "
        f"{cmp['max_rel_diff']:.3e}, elements > 1 bf16 ulp: {cmp['n_over_1ulp']} of {cmp['n_elements']} "
        f"({cmp['n_over_1ulp'] / max(cmp['n_elements'], 1):.2e})"
    )
    worst = cmp.get("worst_ulp_element")
    if worst:
        log(
            f"  worst in ulps: {worst['ulps']:.1f} ulp in {worst['tensor']}[{worst['flat_index']}]: "
            f"mergekit {worst['reference']:.6g} vs posthoc {worst['candidate']:.6g}"
        )
    if cmp.get("n_nan_mismatch"):
        log(f"  NaN in one output only: {cmp['n_nan_mismatch']} elements")
    for key in ("only_in_reference", "only_in_candidate", "shape_mismatch"):
        if cmp[key]:
            log(f"  {key}: {cmp[key][:5]}{' ...' if len(cmp[key]) > 5 else ''} ({len(cmp[key])})")


def parse_methods(values: list[str]) -> list[str]:
    methods = [m for v in values for m in v.split(",") if m]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    return methods


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="work dir (default: %(default)s)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=[",".join(ALL_METHODS)],
        help=f"methods, space or comma separated (default: {','.join(ALL_METHODS)})",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool per job (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="threads for both tools (default: 2)")
    p.add_argument(
        "--skip-mergekit",
        action="store_true",
        help="do not run mergekit (compare against an earlier mergekit output if present)",
    )
    p.add_argument("--skip-posthoc", action="store_true", help="do not run posthoc")
    p.add_argument(
        "--posthoc", default=None, help="posthoc command (default: posthoc next to this python, else on PATH)"
    )
    p.add_argument(
        "--noise-rel",
        type=float,
        default=1e-3,
        help="fine-tune noise std relative to each tensor's RMS (default: %(default)s)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the synthetic models even if cached")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-params", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        p.error("--repeat and --threads must be >= 1")
    return args


def worker_main(args: argparse.Namespace) -> int:
    result = WORKERS[args.worker](json.loads(args.worker_params))
    Path(args.worker_out).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if "torch" in sys.modules:  # see the module docstring
        raise RuntimeError("the orchestrator must not import torch (it would inflate children's ru_maxrss)")

    methods = parse_methods(args.methods)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = workdir / "logs"
    env = child_env(args.threads)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "threads": args.threads,
        "repeat": args.repeat,
        "methods": methods,
        "jobs": {},
    }

    # Tools.
    mergekit_yaml: Path | None = None
    if not args.skip_mergekit:
        mergekit_yaml = ensure_mergekit(workdir / "mergekit-venv", log_dir / "mergekit-install.log")
    posthoc: list[str] | None = None
    if not args.skip_posthoc:
        posthoc = find_posthoc(args.posthoc)
        if posthoc is None:
            log(
                "posthoc: NOT FOUND (no `posthoc` next to this python nor on PATH; use --posthoc CMD). "
                "Skipping the posthoc side."
            )
        else:
            problem = posthoc_problem(posthoc, env)
            if problem:
                log(f"posthoc: {problem}\nSkipping the posthoc side (the mergekit side still runs).")
                posthoc = None

    # Context: start-up and import times.
    log("\n--- context ---")
    startup: dict[str, Any] = {}
    if mergekit_yaml:
        startup["mergekit"] = time_startup(
            [str(mergekit_yaml), "--help"], log_dir / "startup-mergekit.log", env
        )
    if posthoc:
        startup["posthoc"] = time_startup([*posthoc, "merge", "--help"], log_dir / "startup-posthoc.log", env)
    for s in startup.values():
        log(
            f"start-up `{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(s['argv']))}`: "
            f"{s['wall_s']:.2f} s, peak RSS {s['maxrss_gb']:.3f} GB{'' if s['ok'] else '  (FAILED)'}"
        )
    imports = {"posthoc_venv": import_torch_time(sys.executable, env)}
    if mergekit_yaml:
        imports["mergekit_venv"] = import_torch_time(str(mergekit_yaml.parent / "python"), env)
    for name, s in imports.items():
        if "error" in s:
            log(f"import torch ({name}): failed: {s['error']}")
        else:
            log(
                f"import torch ({name}, torch {s['torch']}): {s['first_s']:.2f} s first, {s['second_s']:.2f} s second"
            )
    results["startup"] = startup
    results["import_torch"] = imports

    # Inputs.
    log("")
    models_info = ensure_models(workdir, args.noise_rel, args.threads, args.rebuild)
    results["models"] = models_info
    models_dir = workdir / "models"

    # Jobs.
    for method in methods:
        log(f"\n--- {method} ---")
        job_dir = workdir / "jobs" / method
        job_dir.mkdir(parents=True, exist_ok=True)
        config_path = job_dir / "config.yml"
        config_path.write_text(to_yaml(method_config(method, models_dir)) + "\n")
        mk_out, ph_out = job_dir / "out-mergekit", job_dir / "out-posthoc"
        mk_job = ph_job = None
        if mergekit_yaml:
            mk_argv = [str(mergekit_yaml), str(config_path), str(mk_out), "-j", str(args.threads)]
            mk_job = run_tool("mergekit", mk_argv, mk_out, log_dir, method, args.repeat, env)
        if posthoc:
            ph_argv = [*posthoc, "merge", str(config_path), str(ph_out), "--force"]
            ph_job = run_tool("posthoc", ph_argv, ph_out, log_dir, method, args.repeat, env)
        cmp = None
        mk_ok = mk_job.ok if mk_job else mk_out.exists()  # --skip-mergekit: reuse an earlier output
        if method in DETERMINISTIC and ph_job and ph_job.ok and mk_ok:
            try:
                cmp = run_worker(
                    "compare",
                    {"reference": str(mk_out), "candidate": str(ph_out), "threads": args.threads},
                    sys.executable,
                    env,
                    log_dir / f"{method}-compare.log",
                )
                cmp = {k: v for k, v in cmp.items() if not k.startswith("_")}
            except RuntimeError as e:
                cmp = {"error": str(e)}
        print_job_table(method, mk_job, ph_job, cmp)
        results["jobs"][method] = {
            "config": str(config_path),
            "mergekit": mk_job.summary() if mk_job else None,
            "posthoc": ph_job.summary() if ph_job else None,
            "wall_ratio_posthoc_over_mergekit": ratio(ph_job and ph_job.wall_s, mk_job and mk_job.wall_s),
            "cpu_ratio_posthoc_over_mergekit": ratio(ph_job and ph_job.cpu_s, mk_job and mk_job.cpu_s),
            "rss_ratio_posthoc_over_mergekit": ratio(
                ph_job and ph_job.maxrss_gb, mk_job and mk_job.maxrss_gb
            ),
            "comparison": cmp,
        }

    # Summary.
    log("\n=== summary (wall and CPU: best of runs; RSS: max of runs) ===")
    log(
        f"{'method':17s}{'mk s':>8s}{'ph s':>8s}{'ph/mk':>7s}{'mk cpu':>8s}{'ph cpu':>8s}{'mk GB':>8s}{'ph GB':>8s}{'ph/mk':>7s}"
        f"{'max|diff|':>11s}{'>1ulp':>10s}"
    )
    for method, job in results["jobs"].items():
        mk, ph, cmp = job["mergekit"] or {}, job["posthoc"] or {}, job["comparison"] or {}
        log(
            f"{method:17s}{fmt(mk.get('wall_s')):>8s}{fmt(ph.get('wall_s')):>8s}"
            f"{fmt(job['wall_ratio_posthoc_over_mergekit']):>7s}{fmt(mk.get('cpu_s')):>8s}"
            f"{fmt(ph.get('cpu_s')):>8s}{fmt(mk.get('maxrss_gb')):>8s}"
            f"{fmt(ph.get('maxrss_gb')):>8s}{fmt(job['rss_ratio_posthoc_over_mergekit']):>7s}"
            f"{fmt(cmp.get('max_abs_diff'), '.2e'):>11s}{fmt(cmp.get('n_over_1ulp'), 'd'):>10s}"
        )
    results["orchestrator_maxrss_gb"] = self_maxrss_gb()
    log(
        f"(orchestrator peak RSS {results['orchestrator_maxrss_gb']:.3f} GB: the floor under every RSS figure)"
    )
    out = workdir / "results.json"
    out.write_text(json.dumps(results, indent=2))
    log(f"results: {out}")
    failed = [
        m
        for m, j in results["jobs"].items()
        if any(j[t] is not None and not j[t]["ok"] for t in ("mergekit", "posthoc"))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
