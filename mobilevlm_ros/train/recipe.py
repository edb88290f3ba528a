"""The MobileVLM training recipe at demo scale, on generated road scenes.

Phases (as in the MobileVLM papers, scaled down):
0. data: render the scenes; train a SentencePiece tokenizer (LLaMA settings) on the generated text.
1. vision: pretrain a small CLIP ViT-style tower (336 px, patch 14) on the scenes' ground truth; it stays
   frozen afterwards, as CLIP does in MobileVLM, so its features are computed once and cached.
2. language: pretrain a small MobileLLaMA on the generated conversations as plain text.
3. alignment: train only the LDP v2 projector on image -> caption, vision tower and LLM frozen.
4. instruction tuning: projector + LLM (full fine-tuning, or LoRA with ``lora_rank``) on multi-turn question /
   answer conversations about each scene, loss on the answers only, as LLaVA/MobileVLM do.
Then the model is written in the published MobileVLM_V2 layout and loaded back through the package loader.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.config import LlamaConfig, MobileVLMConfig, VisionConfig
from ..model.llama import MobileLlama
from ..model.prompt import build_prompt, tokenize_with_image
from ..model.projector import build_projector
from ..model.tokenizer import Tokenizer
from .data import Example, conversation, make_examples, normalize
from .modules import VisionPretrainer, add_lora, init_weights, merge_lora, vision_losses
from .text import conversation_text, corpus, train_tokenizer

IMAGE_TOKENS = 144


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    threads: int = 2
    workers: int = 2  # scene-rendering processes
    # model sizes
    vision_width: int = 64
    vision_layers: int = 3  # select layer -2: the first 2 feed MobileVLM, the last one only CLIP's pooled output
    vision_heads: int = 4
    vision_mlp: int = 256
    llm_width: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_mlp: int = 352
    vocab_size: int = 512
    # phase 1
    vision_scenes: int = 6000
    vision_epochs: int = 3
    vision_batch: int = 32
    vision_lr: float = 1.5e-3
    # phase 2
    lm_steps: int = 150
    lm_batch: int = 16
    lm_lr: float = 2e-3
    # phase 3
    align_steps: int = 200
    align_batch: int = 16
    align_lr: float = 2e-3
    # phase 4
    instruct_scenes: int = 12000  # the phase-1 scenes plus new ones
    instruct_epochs: int = 2
    instruct_batch: int = 16
    instruct_lr: float = 1e-3
    lora_rank: int = 0  # 0: full fine-tuning of the LLM
    lora_alpha: float = 16.0

    def vision_config(self) -> VisionConfig:
        return VisionConfig(hidden_size=self.vision_width, intermediate_size=self.vision_mlp,
                            num_layers=self.vision_layers, num_heads=self.vision_heads)

    def llama_config(self, vocab: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab, hidden_size=self.llm_width, intermediate_size=self.llm_mlp,
                           num_layers=self.llm_layers, num_heads=self.llm_heads, num_kv_heads=self.llm_heads)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Trainer:
    """AdamW with warmup + cosine decay and gradient clipping; logs a running loss."""

    def __init__(self, params, total_steps: int, lr: float, log: Callable[[str], None], name: str,
                 weight_decay: float = 0.05):
        self.params = [p for p in params if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
        self.total, self.lr, self.step_no = total_steps, lr, 0
        self.warmup = max(1, min(100, total_steps // 10))
        self.log, self.name = log, name
        self.running: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def step(self, loss: Tensor, parts: dict[str, Tensor] | None = None) -> None:
        for group in self.opt.param_groups:
            group["lr"] = cosine_lr(self.step_no, self.total, self.lr, self.warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step_no += 1
        for key, value in {"loss": loss, **(parts or {})}.items():
            value = float(value.detach()) if isinstance(value, Tensor) else float(value)
            self.running[key] = 0.9 * self.running.get(key, value) + 0.1 * value
        if self.step_no % 50 == 0 or self.step_no == self.total:
            shown = " ".join(f"{k} {v:.4f}" for k, v in self.running.items())
            self.log(f"  [{self.name}] step {self.step_no}/{self.total} {shown} "
                     f"({time.perf_counter() - self.t0:.0f} s)")


# ---------------------------------------------------------------------------------------------------------------
# conversations -> token ids


class ConversationEncoder:
    """Token ids of v1-template conversations exactly as inference builds its prompts, answer tokens marked."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        ids = tokenize_with_image(build_prompt(["x"]), tokenizer)
        self.prefix = ids[: ids.index(-200)]  # BOS + system prompt + "USER:": the same for every conversation

    def encode(self, pairs: list[tuple[str, str]]) -> tuple[list[int], list[bool]]:
        """-> (ids after the image, is-answer flag per id)."""
        texts: list[str] = []
        spans = []
        for q, a in pairs:
            texts.append(q)
            prompt = build_prompt(texts)
            asked = tokenize_with_image(prompt, self.tok)
            answered = tokenize_with_image(prompt + " " + a + "</s>", self.tok)
            spans.append((len(asked), len(answered)))
            texts.append(a)
        full = answered
        assert full[: len(self.prefix)] == self.prefix and full[len(self.prefix)] == -200
        flags = [False] * len(full)
        for lo, hi in spans:
            flags[lo:hi] = [True] * (hi - lo)
        cut = len(self.prefix) + 1
        return full[cut:], flags[cut:]

    def check(self, pairs: list[tuple[str, str]], ids: list[int]) -> None:
        """Each answer's ids must also be a prefix-consistent continuation of its own prompt."""
        texts = [t for pair in pairs for t in pair]
        whole = tokenize_with_image(build_prompt(texts[:-1]) + " " + texts[-1] + "</s>", self.tok)
        assert whole[len(self.prefix) + 1:] == ids


def pad_batch(seqs: list[list[int]], flags: list[list[bool]]) -> tuple[Tensor, Tensor]:
    """ids [B, R] (padded with 0) and next-token targets [B, R] aligned to the input positions before each id."""
    r = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), r, dtype=torch.long)
    targets = torch.full((len(seqs), r), -100, dtype=torch.long)
    for i, (s, f) in enumerate(zip(seqs, flags)):
        ids[i, : len(s)] = torch.tensor(s)
        targets[i, : len(s)] = torch.where(torch.tensor(f), torch.tensor(s), torch.tensor(-100))
    return ids, targets


class VLMForTraining(nn.Module):
    """Projector + LLM over cached vision features, the image spliced after the fixed system prefix."""

    def __init__(self, config: MobileVLMConfig, prefix: list[int]):
        super().__init__()
        self.mm_projector = build_projector(config)
        self.llm = MobileLlama(config.llama)
        self.register_buffer("prefix", torch.tensor(prefix), persistent=False)

    def loss(self, features: Tensor, ids: Tensor, targets: Tensor) -> Tensor:
        """features [B, 576, Dv]; ids/targets [B, R]: the text after the image and its answer targets."""
        b = ids.shape[0]
        image = self.mm_projector(features)
        embed = self.llm.embed_tokens
        embeds = torch.cat([embed(self.prefix).expand(b, -1, -1), image, embed(ids)], dim=1)
        start = self.prefix.numel() + image.shape[1] - 1  # the position whose output predicts ids[:, 0]
        logits = self.llm.forward_all(embeds)[:, start: start + ids.shape[1]]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------------------------------------
# phases


def _batches(n: int, batch: int, epochs: int, gen: torch.Generator) -> Iterator[Tensor]:
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield order[i: i + batch]


def pretrain_vision(recipe: Recipe, examples: list[Example], log) -> VisionPretrainer:
    model = VisionPretrainer(recipe.vision_config(), -2)
    pixels = np.stack([e.pixels for e in examples])
    patch_class = torch.from_numpy(np.stack([e.patch_class for e in examples]).astype(np.float32)).flatten(1, 2)
    patch_attr = torch.from_numpy(np.stack([e.patch_attr for e in examples]).astype(np.float32)).flatten(1, 2)
    patch_center = torch.from_numpy(np.stack([e.patch_center for e in examples])).flatten(1, 2)
    targets = torch.from_numpy(np.stack([e.global_targets for e in examples]))
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 1)
    steps = recipe.vision_epochs * (len(examples) // recipe.vision_batch)
    trainer = Trainer(model.parameters(), steps, recipe.vision_lr, log, "vision")
    model.train()
    for idx in _batches(len(examples), recipe.vision_batch, recipe.vision_epochs, gen):
        x = torch.from_numpy(normalize(pixels[idx.numpy()]))
        _, dense, global_logits = model(x)
        parts = vision_losses(dense, global_logits, patch_class[idx], patch_attr[idx], patch_center[idx],
                              targets[idx])
        trainer.step(sum(parts.values()), parts)
    return model.eval()


@torch.no_grad()
def vision_features(model: VisionPretrainer, examples: list[Example], batch: int = 64) -> Tensor:
    out = []
    for i in range(0, len(examples), batch):
        x = torch.from_numpy(normalize(np.stack([e.pixels for e in examples[i: i + batch]])))
        out.append(model.features(x).to(torch.float16))
    return torch.cat(out)


def pretrain_language(recipe: Recipe, model: VLMForTraining, encoder: ConversationEncoder,
                      examples: list[Example], log) -> None:
    """Plain-text LM on the generated conversations (no image): the decoder learns the language and formats."""
    rng = np.random.default_rng([recipe.seed, 2, 0])
    tok = encoder.tok
    skip = len(encoder.prefix)
    params = list(model.llm.parameters())
    trainer = Trainer(params, recipe.lm_steps, recipe.lm_lr, log, "language")
    model.train()
    for _ in range(recipe.lm_steps):
        seqs, flags = [], []
        for j in rng.integers(len(examples), size=recipe.lm_batch):
            turns = [t for qa in conversation(examples[j].scene, rng) for t in (qa.question, qa.answer)]
            ids = tok.encode(conversation_text(turns))
            seqs.append(ids)
            flags.append([k >= skip for k in range(len(ids))])
        ids, targets = pad_batch(seqs, flags)
        logits = model.llm.forward_all(model.llm.embed_tokens(ids))[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100)
        trainer.step(loss)


def _vlm_phase(recipe: Recipe, model: VLMForTraining, encoder: ConversationEncoder, examples: list[Example],
               features: Tensor, steps: int, batch: int, lr: float, make_pairs, name: str, log,
               rng_tag: int) -> None:
    rng = np.random.default_rng([recipe.seed, rng_tag, 0])
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + rng_tag)
    trainer = Trainer(model.parameters(), steps, lr, log, name)
    model.train()
    batches = _batches(len(examples), batch, 10**6, gen)
    for _ in range(steps):
        idx = next(batches)
        seqs, flags = [], []
        for j in idx.tolist():
            ids, f = encoder.encode(make_pairs(examples[j], rng))
            seqs.append(ids)
            flags.append(f)
        ids, targets = pad_batch(seqs, flags)
        loss = model.loss(features[idx].float(), ids, targets)
        trainer.step(loss)


def _caption_pair(example: Example, rng) -> list[tuple[str, str]]:
    qa = [q for q in conversation(example.scene, rng) if q.kind == "caption"][0]
    return [(qa.question, qa.answer)]


def _all_pairs(example: Example, rng) -> list[tuple[str, str]]:
    return [(qa.question, qa.answer) for qa in conversation(example.scene, rng)]


def train(recipe: Recipe, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    from .export import export_checkpoint

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()

    log(f"rendering {recipe.instruct_scenes} scenes ({recipe.vision_scenes} with dense labels)")
    dense = make_examples(recipe.seed, range(recipe.vision_scenes), True, recipe.workers)
    extra = make_examples(recipe.seed, range(recipe.vision_scenes, recipe.instruct_scenes), False, recipe.workers)
    timings["render"] = time.perf_counter() - t

    t = time.perf_counter()
    sp_bytes = train_tokenizer(corpus([e.scene for e in dense[:2000]], recipe.seed), recipe.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(sp_bytes)
    tokenizer = Tokenizer(out_dir / "tokenizer.model")
    encoder = ConversationEncoder(tokenizer)
    timings["tokenizer"] = time.perf_counter() - t
    log(f"tokenizer: {tokenizer.vocab_size} pieces; prompt prefix {len(encoder.prefix)} tokens")

    t = time.perf_counter()
    log(f"phase 1: vision pretraining, {len(dense)} scenes x {recipe.vision_epochs} epochs")
    vision = pretrain_vision(recipe, dense, log)
    timings["vision"] = time.perf_counter() - t

    t = time.perf_counter()
    examples = dense + extra
    for e in dense:  # the dense targets are no longer needed
        e.patch_class = e.patch_attr = e.patch_center = None
    features = vision_features(vision, examples)
    for e in examples:
        e.pixels = None
    timings["features"] = time.perf_counter() - t

    config = MobileVLMConfig(llama=recipe.llama_config(tokenizer.vocab_size), vision=recipe.vision_config(),
                             projector_type="ldpnetv2", mm_hidden_size=recipe.vision_width,
                             image_aspect_ratio="pad", use_im_patch_token=False)
    model = VLMForTraining(config, encoder.prefix)
    init_weights(model)

    t = time.perf_counter()
    log(f"phase 2: language pretraining, {recipe.lm_steps} steps")
    pretrain_language(recipe, model, encoder, examples, log)
    timings["language"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"phase 3: projector alignment on captions, {recipe.align_steps} steps")
    model.llm.requires_grad_(False)
    _vlm_phase(recipe, model, encoder, examples, features, recipe.align_steps, recipe.align_batch,
               recipe.align_lr, _caption_pair, "align", log, 3)
    model.llm.requires_grad_(True)
    timings["align"] = time.perf_counter() - t

    t = time.perf_counter()
    steps = recipe.instruct_epochs * (len(examples) // recipe.instruct_batch)
    log(f"phase 4: instruction tuning, {steps} steps" + (f" (LoRA rank {recipe.lora_rank})" if recipe.lora_rank
                                                         else " (full fine-tuning)"))
    if recipe.lora_rank:
        model.llm.requires_grad_(False)
        add_lora(model.llm, recipe.lora_rank, recipe.lora_alpha)
        model.llm.embed_tokens.weight.requires_grad_(True)
        model.llm.lm_head.weight.requires_grad_(True)
    _vlm_phase(recipe, model, encoder, examples, features, steps, recipe.instruct_batch, recipe.instruct_lr,
               _all_pairs, "instruct", log, 4)
    if recipe.lora_rank:
        merge_lora(model.llm)
    timings["instruct"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_all
    export_checkpoint(out_dir, recipe, config, vision, model, sp_bytes, timings)
    log("timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return timings


def recipe_dict(recipe: Recipe) -> dict:
    return asdict(recipe)


__all__ = ["Recipe", "train", "replace"]
