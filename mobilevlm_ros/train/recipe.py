"""The MobileVLM training recipe at demo scale, on generated road scenes.

Phases (as in the MobileVLM papers, scaled down):
0. data: render the scenes; train a SentencePiece tokenizer (LLaMA settings) on the generated text.
1. vision: pretrain a small CLIP ViT-style tower (336 px, patch 28) on the scenes' ground truth (see
   modules.VisionPretrainer); it stays frozen afterwards, as CLIP does in MobileVLM, so its features are computed
   once and cached.
2. alignment: train only the LDP v2 projector on image -> caption, the (randomly initialised) LLM frozen.
3. instruction tuning: projector + LLM (full fine-tuning, or LoRA with ``lora_rank``) on every question / answer
   pair about each scene, loss on the answers only, as LLaVA/MobileVLM do. A small LLM learns slowly to route
   a question to the right image facts, so a training-only head at an inner layer also predicts, at the position
   that starts each answer, the facts about the class the question names (how many, which side, which colour):
   every question teaches the routing, not only the rare ones that ask for it. The head is not exported.
Then the model is written in the published MobileVLM_V2 layout and loaded back through the package loader.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..demo.scenes import CLASSES
from ..model.config import LDP_V2_GRID, LlamaConfig, MobileVLMConfig, VisionConfig
from ..model.llama import MobileLlama
from ..model.projector import build_projector
from ..model.prompt import build_prompt, tokenize_with_image
from ..model.tokenizer import Tokenizer
from .data import (IGNORE, MAX_COUNT, PATCH, SUBJECT_ATTRS, Example, conversation, make_examples, normalize,
                   subject_facts)
from .modules import (TOKEN_SPLIT, VisionPretrainer, add_lora, init_weights, merge_lora, packed_forward,
                      token_losses, token_targets, vision_losses, vision_report)
from .text import corpus, train_tokenizer

IMAGE_TOKENS = LDP_V2_GRID * LDP_V2_GRID
SUBJECT_SPLIT = (len(CLASSES), MAX_COUNT + 1, 2, len(SUBJECT_ATTRS))  # see data.subject_facts


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    threads: int = 2
    workers: int = 2  # scene-rendering processes
    scenes: int = 8000
    # model sizes
    vision_width: int = 128
    vision_layers: int = 4  # select layer -2: MobileVLM reads the first 3; the last only feeds CLIP's own head
    vision_heads: int = 4
    vision_mlp: int = 512
    llm_width: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_mlp: int = 352
    vocab_size: int = 512
    # phase 1
    vision_steps: int = 3400
    vision_batch: int = 32
    vision_lr: float = 2e-3
    # phase 2
    align_steps: int = 100
    align_batch: int = 16
    align_lr: float = 2e-3
    # phase 3
    instruct_steps: int = 1100
    instruct_batch: int = 16
    instruct_lr: float = 3e-3
    subject_layer: int = 2  # the LLM layer whose output the training-only subject head reads
    lora_rank: int = 0  # 0: full fine-tuning of the LLM
    lora_alpha: float = 16.0

    def vision_config(self) -> VisionConfig:
        return VisionConfig(hidden_size=self.vision_width, intermediate_size=self.vision_mlp,
                            num_layers=self.vision_layers, num_heads=self.vision_heads, patch_size=PATCH)

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


class BlockEncoder:
    """Token ids of single-turn v1 conversations exactly as inference builds them, answer tokens marked.

    Every prompt is ``prefix <image> block``: the prefix (BOS, system prompt, "USER:") is the same for all, the
    block is the rest ("\n{question} ASSISTANT: {answer}</s>"). Blocks are tokenized through the inference code
    (build_prompt + tokenize_with_image), so training sees the very ids the pipeline produces.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        ids = tokenize_with_image(build_prompt(["x"]), tokenizer)
        self.prefix = ids[: ids.index(-200)]
        self._cache: dict[tuple[str, str], tuple[list[int], list[bool]]] = {}

    def block(self, question: str, answer: str) -> tuple[list[int], list[bool]]:
        key = (question, answer)
        if key not in self._cache:
            prompt = build_prompt([question])
            asked = tokenize_with_image(prompt, self.tok)
            full = tokenize_with_image(prompt + " " + answer + "</s>", self.tok)
            cut = len(self.prefix) + 1
            assert full[: len(asked)] == asked and asked[:cut] == self.prefix + [-200], (question, answer)
            ids = full[cut:]
            self._cache[key] = ids, [i >= len(asked) - cut for i in range(len(ids))]
        return self._cache[key]


@dataclass
class PackedBatch:
    """Rows of blocks packed after a shared context (prefix + image); see modules.packed_forward."""

    ids: Tensor  # [B, R] block tokens (0-padded)
    positions: Tensor  # [B, C + R]
    mask: Tensor  # [B, C + R, C + R]
    pred_rows: Tensor  # [N] row of each supervised token
    pred_cols: Tensor  # [N] position (in C + R) whose output predicts it
    targets: Tensor  # [N] the supervised token ids
    start_rows: Tensor  # [M] row of each block
    start_cols: Tensor  # [M] position whose output predicts the block's first answer token
    subjects: Tensor  # [M, 4] data.subject_facts of each block's question (IGNORE where not given)


def pack(rows: list[list[tuple[list[int], list[bool]]]], context: int,
         subjects: list[list[tuple[int, ...]]] | None = None) -> PackedBatch:
    """Each row: blocks (ids, answer flags). A block token sees the context and its own block, causally, at the
    positions it would have alone; supervised: the answer tokens. subjects: per block, its subject facts."""
    lengths = [sum(len(ids) for ids, _ in row) for row in rows]
    r = max(lengths)
    b = len(rows)
    ids = torch.zeros(b, r, dtype=torch.long)
    block_of = torch.full((b, r), -1, dtype=torch.long)
    offset_in_block = torch.zeros(b, r, dtype=torch.long)
    pred_rows, pred_cols, targets, start_rows, start_cols, facts = [], [], [], [], [], []
    for i, row in enumerate(rows):
        o = 0
        for j, (block, flags) in enumerate(row):
            n = len(block)
            ids[i, o: o + n] = torch.tensor(block)
            block_of[i, o: o + n] = j
            offset_in_block[i, o: o + n] = torch.arange(n)
            for k in range(1, n):
                if flags[k]:
                    pred_rows.append(i)
                    pred_cols.append(context + o + k - 1)
                    targets.append(block[k])
            start_rows.append(i)
            start_cols.append(context + o + flags.index(True) - 1)
            facts.append(subjects[i][j] if subjects else (IGNORE,) * len(SUBJECT_SPLIT))
            o += n
    same = (block_of[:, :, None] == block_of[:, None, :]) & (block_of[:, :, None] >= 0)
    causal = torch.ones(r, r, dtype=torch.bool).tril()
    mask = torch.zeros(b, context + r, context + r, dtype=torch.bool)
    mask[:, :context, :context] = torch.ones(context, context, dtype=torch.bool).tril()
    mask[:, context:, :context] = True
    mask[:, context:, context:] = same & causal
    positions = torch.cat([torch.arange(context).expand(b, -1), context + offset_in_block], dim=1)
    return PackedBatch(ids, positions, mask, torch.tensor(pred_rows), torch.tensor(pred_cols), torch.tensor(targets),
                       torch.tensor(start_rows), torch.tensor(start_cols), torch.tensor(facts, dtype=torch.long))


class VLMForTraining(nn.Module):
    """Projector + LLM over cached vision features (prefix, image, packed blocks), with two training-only heads:
    the subject head on the output of LLM layer ``subject_layer``, and a token head on the projector's output that
    keeps each visual token saying what it shows (modules.token_losses), so that a thin object's one or two tokens
    stay findable for the decoder."""

    def __init__(self, config: MobileVLMConfig, prefix: list[int], subject_layer: int):
        super().__init__()
        self.mm_projector = build_projector(config)
        self.llm = MobileLlama(config.llama)
        self.subject_layer = subject_layer
        d = config.llama.hidden_size
        self.subject_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, sum(SUBJECT_SPLIT)))
        self.token_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, sum(TOKEN_SPLIT)))
        self.register_buffer("prefix", torch.tensor(prefix), persistent=False)

    def losses(self, features: Tensor, batch: PackedBatch, tokens: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
        """features [B, patches, Dv], tokens: modules.token_targets of the 144 visual tokens -> answer
        cross-entropy, the subject head's (0 where nothing is given) and the token head's."""
        b = batch.ids.shape[0]
        embed = self.llm.embed_tokens
        image = self.mm_projector(features)
        embeds = torch.cat([embed(self.prefix).expand(b, -1, -1), image, embed(batch.ids)], 1)
        hidden = packed_forward(self.llm, embeds, batch.positions, batch.mask)
        logits = self.llm.lm_head(self.llm.norm(hidden[-1][batch.pred_rows, batch.pred_cols]))
        inner = self.subject_head(hidden[self.subject_layer - 1][batch.start_rows, batch.start_cols])
        subject = [F.cross_entropy(part, batch.subjects[:, i], ignore_index=IGNORE)
                   for i, part in enumerate(inner.split(SUBJECT_SPLIT, dim=-1))
                   if (batch.subjects[:, i] != IGNORE).any()]
        return {"answer": F.cross_entropy(logits, batch.targets),
                "subject": torch.stack(subject).sum() if subject else logits.new_zeros(()),
                "tokens": sum(token_losses(self.token_head(image), *tokens).values())}


# ---------------------------------------------------------------------------------------------------------------
# phases


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled epochs of index batches."""
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield order[i: i + batch]


def _dense_targets(examples: list[Example]) -> tuple[Tensor, ...]:
    def stacked(name: str) -> Tensor:
        return torch.from_numpy(np.stack([getattr(e, name) for e in examples]).astype(np.float32)).flatten(1, 2)

    return (stacked("patch_class"), stacked("patch_attr"), stacked("patch_side"), stacked("patch_density"),
            torch.from_numpy(np.stack([e.scene_facts for e in examples])))


def pretrain_vision(recipe: Recipe, examples: list[Example], held_out: list[Example], log) -> VisionPretrainer:
    model = VisionPretrainer(recipe.vision_config(), -2)
    pixels = np.stack([e.pixels for e in examples])
    targets = _dense_targets(examples)
    held_pixels = torch.from_numpy(normalize(np.stack([e.pixels for e in held_out])))
    held_targets = _dense_targets(held_out)
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 1)
    trainer = Trainer(model.parameters(), recipe.vision_steps, recipe.vision_lr, log, "vision")
    model.train()
    batches = _batches(len(examples), recipe.vision_batch, gen)
    for _ in range(recipe.vision_steps):
        idx = next(batches)
        _, dense, scene = model(torch.from_numpy(normalize(pixels[idx.numpy()])))
        parts = vision_losses(dense, scene, *(t[idx] for t in targets))
        trainer.step(sum(parts.values()), parts)
        if trainer.step_no % 250 == 0 or trainer.step_no == recipe.vision_steps:
            with torch.no_grad():
                model.eval()
                _, dense, scene = model(held_pixels)
                model.train()
            report = vision_report(dense, scene, *held_targets)
            log(f"  [vision] held-out {len(held_out)} scenes: " + " ".join(f"{k} {v:.3f}" for k, v in report.items()))
    return model.eval()


@torch.no_grad()
def vision_features(model: VisionPretrainer, examples: list[Example], batch: int = 64) -> Tensor:
    out = []
    for i in range(0, len(examples), batch):
        x = torch.from_numpy(normalize(np.stack([e.pixels for e in examples[i: i + batch]])))
        out.append(model.features(x).to(torch.float16))
    return torch.cat(out)


def _vlm_phase(recipe: Recipe, model: VLMForTraining, encoder: BlockEncoder, examples: list[Example],
               features: Tensor, tokens: tuple[Tensor, ...], steps: int, batch: int, lr: float,
               kinds: tuple[str, ...] | None, name: str, log, rng_tag: int) -> None:
    """Image + blocks: each scene's questions of the given kinds (None: all) packed into one row."""
    rng = np.random.default_rng([recipe.seed, rng_tag, 0])
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + rng_tag)
    trainer = Trainer(model.parameters(), steps, lr, log, name)
    model.train()
    context = len(encoder.prefix) + IMAGE_TOKENS
    batches = _batches(len(examples), batch, gen)
    for _ in range(steps):
        idx = next(batches)
        rows, subjects = [], []
        for j in idx.tolist():
            scene = examples[j].scene
            turns = [qa for qa in conversation(scene, rng) if kinds is None or qa.kind in kinds]
            rows.append([encoder.block(qa.question, qa.answer) for qa in turns])
            subjects.append([subject_facts(scene, qa.subject) for qa in turns])
        parts = model.losses(features[idx].float(), pack(rows, context, subjects), tuple(t[idx] for t in tokens))
        trainer.step(sum(parts.values()), parts)


def train(recipe: Recipe, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    from .export import export_checkpoint

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()

    log(f"rendering {recipe.scenes} scenes with dense labels ({recipe.workers} processes)")
    examples = make_examples(recipe.seed, range(recipe.scenes), recipe.workers)
    held_out = make_examples(recipe.seed + 1, range(128), recipe.workers)  # progress reports only
    timings["render"] = time.perf_counter() - t

    t = time.perf_counter()
    sp_bytes = train_tokenizer(corpus([e.scene for e in examples[:2000]], recipe.seed), recipe.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(sp_bytes)
    tokenizer = Tokenizer(out_dir / "tokenizer.model")
    encoder = BlockEncoder(tokenizer)
    timings["tokenizer"] = time.perf_counter() - t
    log(f"tokenizer: {tokenizer.vocab_size} pieces; prompt prefix {len(encoder.prefix)} tokens")

    t = time.perf_counter()
    log(f"phase 1: vision pretraining, {recipe.vision_steps} steps of {recipe.vision_batch} scenes")
    vision = pretrain_vision(recipe, examples, held_out, log)
    del held_out
    timings["vision"] = time.perf_counter() - t

    t = time.perf_counter()
    features = vision_features(vision, examples)
    tokens = token_targets(*_dense_targets(examples)[:3])
    for e in examples:  # only the scenes' question/answer pairs are needed from here on
        e.pixels = e.patch_class = e.patch_attr = e.patch_side = e.patch_density = None
    timings["features"] = time.perf_counter() - t

    config = MobileVLMConfig(llama=recipe.llama_config(tokenizer.vocab_size), vision=recipe.vision_config(),
                             projector_type="ldpnetv2", mm_hidden_size=recipe.vision_width,
                             image_aspect_ratio="pad", use_im_patch_token=False)
    model = VLMForTraining(config, encoder.prefix, recipe.subject_layer)
    init_weights(model)

    t = time.perf_counter()
    log(f"phase 2: projector alignment on captions, {recipe.align_steps} steps")
    model.llm.requires_grad_(False)
    _vlm_phase(recipe, model, encoder, examples, features, tokens, recipe.align_steps, recipe.align_batch,
               recipe.align_lr, ("caption",), "align", log, 3)
    model.llm.requires_grad_(True)
    timings["align"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"phase 3: instruction tuning, {recipe.instruct_steps} steps" +
        (f" (LoRA rank {recipe.lora_rank})" if recipe.lora_rank else " (full fine-tuning)"))
    if recipe.lora_rank:
        model.llm.requires_grad_(False)
        add_lora(model.llm, recipe.lora_rank, recipe.lora_alpha)
        model.llm.embed_tokens.weight.requires_grad_(True)
        model.llm.lm_head.weight.requires_grad_(True)
    _vlm_phase(recipe, model, encoder, examples, features, tokens, recipe.instruct_steps, recipe.instruct_batch,
               recipe.instruct_lr, None, "instruct", log, 4)
    if recipe.lora_rank:
        merge_lora(model.llm)
    timings["instruct"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_all
    export_checkpoint(out_dir, recipe, config, vision, model, sp_bytes, timings)
    log("timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return timings
