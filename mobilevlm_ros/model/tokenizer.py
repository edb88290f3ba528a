"""The slow LLaMA tokenizer's behaviour (transformers 4.33, legacy mode) on top of sentencepiece alone.

MobileVLM loads ``AutoTokenizer.from_pretrained(path, use_fast=False)``; these are the parts of it that shape ids
and text, reproduced so the runtime needs no transformers:
- ``<s>``, ``</s>`` and ``<unk>`` written in the text are special tokens: the text is split around them and each
  remaining chunk is encoded on its own (so it gets its own dummy-prefix ``▁``); no whitespace is stripped.
- decode drops one leading ``▁`` of the first piece *and* lets sentencepiece drop the dummy-prefix space, and
  when special tokens are kept, a space goes before a special token that follows ordinary text.
"""
from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from .errors import CheckpointError

SPIECE_UNDERLINE = "▁"


class Tokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise CheckpointError(path, "tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(path, f"not a SentencePiece model: {e}") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.special_ids = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        # Longest first, so that a special token containing another (none today) would still win.
        specials = sorted(self.special_ids, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [self.bos_id] if bos else []
        for chunk in self._special_split.split(text):
            if chunk in self.special_ids:
                ids.append(self.special_ids[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Ids beyond the SentencePiece vocabulary (an <im_patch> row added by training) are never text.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        special = set(self.special_ids.values())
        if skip_special_tokens:
            ids = [i for i in ids if i not in special]
        if not ids:
            return ""
        pieces = [self.sp.id_to_piece(i) for i in ids]
        if pieces[0].startswith(SPIECE_UNDERLINE):
            pieces[0] = pieces[0][1:]
        out = ""
        run: list[str] = []
        prev_special = False
        for i, (token_id, piece) in enumerate(zip(ids, pieces)):
            if token_id in special:
                if not prev_special and i != 0:
                    out += " "
                out += self.sp.decode_pieces(run) + piece
                run = []
                prev_special = True
            else:
                run.append(piece)
                prev_special = False
        return out + self.sp.decode_pieces(run)
