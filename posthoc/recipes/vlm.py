"""Cross-modal stacking: a small vision encoder + a projector module + a language model = one LLaVA checkpoint.

1. `train_vision`: a small ViT (transformers' CLIPVisionModel, one channel, 8x8 images in 2x2 = 4 patches
   of 4x4 pixels) trained on scikit-learn's digits with a linear head on its [CLS] output;
2. `assemble_vlm`: the vision encoder, a freshly initialised projector (LLaVA's 2-layer MLP from the
   vision width to the language model's) and SmolLM2-135M written as one `LlavaForConditionalGeneration`
   checkpoint that `from_pretrained` loads; an image is 4 tokens (its 4 patches; LLaVA's "default" feature
   selection drops [CLS]), entered in the prompt as 4 copies of an image token (a special token SmolLM2
   does not use in text). Short on purpose: every token costs a pass through all 30 layers of the LM;
3. `train_projector`: only the projector trains (the vision encoder and the language model are frozen),
   on the next-token loss of the digit's English name after the prompt (4 image tokens + " This digit is",
   then the name: 8 tokens an example);
4. `evaluate_vlm`: greedy generation for held-out images; accuracy = the first generated word is the name.

Pixel values: the digits' 0..16 grey levels scaled to [-1, 1] (x / 8 − 1); `posthoc_vlm.json` in the
checkpoint records that, the prompt and the image token, which is all a user needs to call it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posthoc.checkpoint import CheckpointWriter, TensorSpec, copy_side_files, open_checkpoint, save_state_dict
from posthoc.errors import ConfigError, DataError
from posthoc.finetune import FinetuneSettings, batch_indices, finetune
from posthoc.models import load_model
from posthoc.recipes.datasets import read_dataset
from posthoc.recipes.registry import StepContext, step_kind
from posthoc.threads import torch_threads

log = logging.getLogger(__name__)

VLM_FILE = "posthoc_vlm.json"
IMAGE_TOKEN = "<jupyter_text>"  # a SmolLM2 special token that never occurs in plain text
PROMPT = " This digit is"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_examples(
    *, validation: float, test: float, seed: int, per_class: int | None = None
) -> list[dict[str, Any]]:
    """sklearn's digits as examples {split, label, image: 64 ints 0..16}, split per class by a seeded shuffle."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set ships with scikit-learn: `pip install scikit-learn`") from None
    digits = load_digits()
    examples = []
    for label in range(10):
        members = [i for i, y in enumerate(digits.target) if y == label]
        random.Random(f"{seed}:{label}").shuffle(members)
        n_test, n_val = round(len(members) * test), round(len(members) * validation)
        for rank, i in enumerate(members):
            split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
            examples.append({"split": split, "label": label, "image": [int(v) for v in digits.data[i]]})
    if per_class is not None:
        taken: dict[tuple[str, int], int] = {}
        kept = []
        for e in examples:
            key = (e["split"], e["label"])
            if taken.get(key, 0) < per_class:
                taken[key] = taken.get(key, 0) + 1
                kept.append(e)
        examples = kept
    return examples


def pixels(examples: Sequence[dict[str, Any]]) -> torch.Tensor:
    """(n, 1, 8, 8) float32 in [-1, 1]."""
    return torch.tensor([e["image"] for e in examples], dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0


# -------------------------------------------------------------------------------------- vision encoder


@step_kind("train_vision", inputs=("data",), outputs=("out",))
def train_vision(
    ctx: StepContext,
    *,
    data: Path,
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """A small ViT (CLIPVisionModel) trained to classify the digits; saved as a Hugging Face checkpoint."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    dataset = read_dataset(data)
    train, val = dataset.part("train"), dataset.part("validation")
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=8, patch_size=4, num_channels=1,
                              architectures=["CLIPVisionModel"])  # fmt: skip
    with torch_threads(ctx.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
        head = nn.Linear(hidden, 10)
        x, y = pixels(train), torch.tensor([e["label"] for e in train])
        optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
        model.train()
        losses = []
        for indices in batch_indices(len(train), steps, batch_size, seed):
            logits = head(model(pixel_values=x[indices]).pooler_output)
            loss = nn.functional.cross_entropy(logits, y[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            accuracy = float((head(model(pixel_values=pixels(val)).pooler_output).argmax(-1)
                              == torch.tensor([e["label"] for e in val])).float().mean()) if val else None  # fmt: skip
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_state_dict(state, out, config=config.to_dict(), force=True,
                    extra_json={"vision_probe.json": {"validation_accuracy": accuracy, "loss_last": losses[-1]}})  # fmt: skip
    return {"validation_accuracy": accuracy, "loss_first": losses[0], "loss_last": losses[-1]}


# ------------------------------------------------------------------------------------------ assembly


@step_kind("assemble_vlm", inputs=("vision", "language_model"), outputs=("out",))
def assemble_vlm(ctx: StepContext, *, vision: Path, language_model: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """One LlavaForConditionalGeneration checkpoint: vision encoder + fresh projector + language model."""
    from transformers import AutoConfig, AutoTokenizer, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vision_config = AutoConfig.from_pretrained(vision)
    text_config = AutoConfig.from_pretrained(language_model)
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ConfigError(f"{language_model}: the tokenizer has no {IMAGE_TOKEN!r} token to stand for image patches")
    config = LlavaConfig(vision_config=vision_config.to_dict() | {"model_type": vision_config.model_type},
                         text_config=text_config, image_token_id=image_token_id, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=text_config.tie_word_embeddings,
                         architectures=["LlavaForConditionalGeneration"])  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(config)
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2  # patches ("default" drops [CLS])
    specs, sources = [], []
    with open_checkpoint(vision) as v, open_checkpoint(language_model) as lm:
        for name, info in v.tensors.items():
            new = "model.vision_tower." + name
            specs.append(TensorSpec(new, info.shape, info.dtype))
            sources.append((v, name))
        for name, info in lm.tensors.items():
            new = "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
            specs.append(TensorSpec(new, info.shape, info.dtype))
            sources.append((lm, name))
        for name, tensor in projector.state_dict().items():
            specs.append(TensorSpec(f"model.multi_modal_projector.{name}", tuple(tensor.shape), tensor.dtype))
            sources.append((None, tensor))
        with CheckpointWriter(out, specs, force=True, protect=[vision, language_model]) as writer:
            for spec, (ckpt, ref) in zip(specs, sources):
                writer.write(spec.name, ref if ckpt is None else ckpt.read(ref))
            copy_side_files(language_model, writer, config_from=None)
            writer.add_json("config.json", config.to_dict())
            writer.add_json(VLM_FILE, {"image_token": IMAGE_TOKEN, "image_token_id": image_token_id,
                                       "image_tokens": tokens, "prompt": PROMPT, "pixel_values": "grey levels 0..16 -> x / 8 - 1",
                                       "image_size": vision_config.image_size, "names": list(NAMES)})  # fmt: skip
            writer.commit()
    return {"tensors": len(specs), "image_tokens": tokens}


def vlm_inputs(tokenizer: Any, info: dict[str, Any], answers: Sequence[str] | None, count: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (and labels when answers are given) for `count` images, right-padded."""
    prompt = [info["image_token_id"]] * info["image_tokens"] + tokenizer(info["prompt"], add_special_tokens=False)["input_ids"]
    if answers is None:
        ids = torch.tensor([prompt] * count)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows, labels = [], []
    for answer in answers:
        target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]  # one token for each digit name
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class ImageCaptionObjective:
    """Next-token loss of each image's name after the prompt (only the name is scored)."""

    name = "image_caption"
    auto_class = "LlavaForConditionalGeneration"

    def __init__(self, examples: Sequence[dict[str, Any]], label_names: Sequence[str], info: dict[str, Any]):
        if not examples:
            raise DataError("no training images")
        self.examples, self.label_names, self.info = list(examples), list(label_names), info

    def __len__(self) -> int:
        return len(self.examples)

    def build(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        return nn.Module()

    def loss(self, model: nn.Module, tokenizer: Any, indices: Sequence[int], max_length: int) -> torch.Tensor:
        chosen = [self.examples[i] for i in indices]
        batch = vlm_inputs(tokenizer, self.info, [self.label_names[e["label"]] for e in chosen], len(chosen))
        return model(**batch, pixel_values=pixels(chosen)).loss

    def save(self, directory: Path) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"objective": self.name, "examples": len(self.examples)}


@step_kind("train_projector", inputs=("model", "data"), outputs=("out",))
def train_projector(
    ctx: StepContext,
    *,
    model: Path,
    data: Path,
    out: Path,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    trainable: str = "multi_modal_projector",
) -> dict[str, Any]:
    """Train only the projector of an assembled VLM on the digits' names (next-token loss)."""
    info = json.loads((model / VLM_FILE).read_text())
    dataset = read_dataset(data)
    objective = ImageCaptionObjective(dataset.part("train"), dataset.label_names, info)
    pattern = re.compile(trainable)
    settings = FinetuneSettings(steps=steps, batch_size=batch_size, max_length=64, encoder_lr=lr, seed=seed)
    result = finetune(model, objective, out, settings=settings, trainable=lambda n: bool(pattern.search(n)),
                      threads=ctx.threads, force=True, progress=ctx.progress, name=ctx.name)  # fmt: skip
    (out / VLM_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return {"seconds": round(result.seconds, 1), "loss_first": result.losses[0], "loss_last": result.losses[-1]}


@step_kind("evaluate_vlm", inputs=("model", "data"), outputs=("out",))
def evaluate_vlm(
    ctx: StepContext,
    *,
    model: Path,
    data: Path,
    out: Path,
    split: str = "test",
    per_class: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 2,
) -> dict[str, Any]:
    """Greedy generation for held-out images; accuracy of the first generated word against the digit's name."""
    info = json.loads((model / VLM_FILE).read_text())
    dataset = read_dataset(data)
    examples = dataset.part(split)
    if per_class is not None:
        examples = [e for i, e in enumerate(examples) if sum(x["label"] == e["label"] for x in examples[:i]) < per_class]
    started = time.perf_counter()
    vlm, tokenizer, _ = load_model(model, auto_class="LlavaForConditionalGeneration")
    generated: list[str] = []
    with torch_threads(ctx.threads), torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = vlm_inputs(tokenizer, info, None, len(chunk))
            ids = vlm.generate(**batch, pixel_values=pixels(chunk), max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            generated += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    words = [(g.strip().split() or [""])[0].strip(".,!").lower() for g in generated]
    correct = [w == dataset.label_names[e["label"]] for w, e in zip(words, examples)]
    accuracy = sum(correct) / len(correct)
    samples = [{"label": dataset.label_names[e["label"]], "generated": g} for e, g in zip(examples[:10], generated[:10])]
    result = {"split": split, "images": len(examples), "accuracy": accuracy, "samples": samples,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    table = f"cross-modal: {len(examples)} held-out digit images, accuracy of the generated English name: {accuracy:.3f}"
    return {"table": table, "accuracy": accuracy}
