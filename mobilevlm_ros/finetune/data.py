"""Training data in the format MobileVLM trains on, turned into token ids and labels exactly as the reference does.

The reference (mobilevlm/train/train.py, which reuses LLaVA's data code) reads a JSON list of records::

    [{"id": "0", "image": "frames/0.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nIs the road clear?"},
                        {"from": "gpt", "value": "yes"}, ...]}]

and, for the ``v1`` template every MobileVLM fine-tune uses:
- ``preprocess_multimodal`` moves ``<image>`` to the front of its turn ("<image>\\n" + the rest, stripped);
- the conversation is written with the Vicuna v1 template (``model.prompt``: the same text inference builds) and
  tokenized chunk by chunk around ``<image>`` (``tokenizer_image_token``, here ``model.prompt.tokenize_with_image``);
- ``preprocess_v1`` masks with IGNORE_INDEX the BOS, every user turn and each "ASSISTANT: " that opens an answer,
  by token counts of the rounds split on "</s>" (the ``- 2`` drops a round's BOS and the lone "▁" that ends
  "ASSISTANT: "); what is left, each answer and its "</s>", is what the loss counts;
- ``prepare_inputs_labels_for_multimodal`` splices the visual tokens in at the -200 id, labelled IGNORE_INDEX.

Every record is checked before anything trains: a problem raises :class:`DatasetError` naming the file and record.
The reference would skip a bad record silently (a tokenization mismatch masks all of it) or truncate it to the
context; here it is an error, since a fine-tune that quietly learns nothing from some records is worse.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..model.mobilevlm import IMAGE_TOKEN_INDEX
from ..model.prompt import IMAGE_PLACEHOLDER, STOP_STR, build_prompt, tokenize_with_image
from ..model.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the reference's label for "no loss here" (torch's cross-entropy ignore_index)
ROLES = ("human", "gpt")
ANSWER_SEP = " ASSISTANT: "  # conv.sep + conv.roles[1] + ": " in preprocess_v1


class DatasetError(ValueError):
    """A training file or one of its records cannot be used; the message names the file, the record and why."""

    def __init__(self, path: Path | str, problem: str, record: int | None = None, record_id: object = None):
        where = str(path) if record is None else f"{path}: record {record}" + (
            f" (id {record_id!r})" if record_id is not None else "")
        self.path, self.record, self.problem = str(path), record, problem
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Record:
    """One validated record: its image file and the turns (user, assistant, ...), the image marker taken out of
    the first user turn (build_prompt puts "<image>\\n" back in front of it, as preprocess_multimodal does)."""

    index: int
    record_id: object
    image: Path
    turns: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """A record as the decoder trains on it: the prompt ids (-200 where the image goes) and the reference's labels,
    aligned with the ids (IGNORE_INDEX where no loss is taken)."""

    record: Record
    input_ids: list[int]
    labels: list[int]

    def spliced_labels(self, image_tokens: int) -> list[int]:
        """Labels over the decoder's sequence: the -200 slot widened to image_tokens IGNORE_INDEX entries."""
        out: list[int] = []
        for token, label in zip(self.input_ids, self.labels):
            out.extend([IGNORE_INDEX] * image_tokens if token == IMAGE_TOKEN_INDEX else [label])
        return out


def read_json(path: Path, error, missing: str = "file not found"):
    """The parsed JSON file; a missing or malformed file raises error(path, reason) (DatasetError,
    CheckpointError: the caller's kind of problem) with the reason, never a traceback."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(path, missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(path, f"not valid JSON: {e}") from None


def read_dataset(path: str | Path, image_folder: str | Path | None = None) -> list[Record]:
    """The records of a LLaVA-style JSON file, each checked: image paths (relative ones under image_folder, by
    default the JSON file's directory) must name readable images; turns must alternate human and gpt, end with
    gpt and carry exactly one ``<image>``, in the first human turn."""
    path = Path(path)
    data = read_json(path, DatasetError)
    if not isinstance(data, list) or not data:
        raise DatasetError(path, "expected a non-empty JSON list of records")
    folder = Path(image_folder) if image_folder is not None else path.parent
    return [_record(path, folder, i, item) for i, item in enumerate(data)]


def _record(path: Path, folder: Path, index: int, item: object) -> Record:
    record_id = item.get("id") if isinstance(item, dict) else None

    def fail(problem: str) -> DatasetError:
        return DatasetError(path, problem, index, record_id)

    if not isinstance(item, dict):
        raise fail(f"expected an object with 'image' and 'conversations', got {type(item).__name__}")
    image = item.get("image")
    if not isinstance(image, str) or not image:
        raise fail("no 'image' (every record needs one: the vision tower reads it)")
    image_path = folder / image
    try:
        with Image.open(image_path) as im:
            im.load()
    except FileNotFoundError:
        raise fail(f"image {str(image_path)!r} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise fail(f"image {str(image_path)!r} cannot be read: {e}") from None
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise fail("no 'conversations' list")
    for j, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and turn.get("from") in ROLES and isinstance(turn.get("value"), str)):
            raise fail(f"turn {j}: expected {{'from': 'human' or 'gpt', 'value': text}}, got {turn!r}")
    if conversations[0]["from"] == "gpt":  # preprocess_v1: "Skip the first one if it is not from human"
        conversations = conversations[1:]
    for j, turn in enumerate(conversations):
        if turn["from"] != ROLES[j % 2]:
            raise fail(f"turn {j} is from {turn['from']!r}: turns must alternate human, gpt, human, ...")
    if len(conversations) < 2 or len(conversations) % 2:
        raise fail("the conversation must end with a gpt turn (an answer to learn)")
    values = [turn["value"] for turn in conversations]
    markers = [v.count(IMAGE_PLACEHOLDER) for v in values]
    if sum(markers) == 0:
        raise fail(f"no {IMAGE_PLACEHOLDER} in any turn: the first human turn must say where the image goes")
    if markers[0] != 1 or sum(markers) != 1:
        raise fail(f"{IMAGE_PLACEHOLDER} must appear exactly once, in the first human turn (found {markers})")
    if any(not v.strip() for v in values[1::2]):
        raise fail("an empty gpt turn: nothing to learn")
    turns = (values[0].replace(IMAGE_PLACEHOLDER, "").strip(),) + tuple(values[1:])
    return Record(index, record_id, image_path, turns)


def conversation_text(turns: Sequence[str]) -> str:
    """The whole conversation (user, assistant, ..., assistant) as the v1 template writes it for training."""
    return build_prompt(turns[:-1]) + " " + turns[-1] + STOP_STR


def reference_labels(prompt: str, input_ids: list[int], tokenizer: Tokenizer) -> tuple[list[int], int, int]:
    """preprocess_v1's masking of one conversation: (labels, tokens it accounted for, tokens that are not padding).
    The two counts differ when a turn's text breaks the round split (it contains "</s>" or " ASSISTANT: ")."""
    labels = list(input_ids)

    def ignore(start: int, stop: int) -> None:
        for k in range(max(start, 0), min(stop, len(labels))):
            labels[k] = IGNORE_INDEX

    cur = 1
    ignore(0, cur)
    for round_text in prompt.split(STOP_STR):
        if round_text == "":
            break
        parts = round_text.split(ANSWER_SEP)
        if len(parts) != 2:
            break
        round_len = len(tokenize_with_image(round_text, tokenizer))
        instruction_len = len(tokenize_with_image(parts[0] + ANSWER_SEP, tokenizer)) - 2
        ignore(cur, cur + instruction_len)
        cur += round_len
    ignore(cur, len(labels))
    pad_id = tokenizer.unk_id  # the reference pads with the unk token and counts what is not padding
    return labels, cur, sum(token != pad_id for token in input_ids)


def encode(record: Record, tokenizer: Tokenizer, image_tokens: int, context: int, path: Path | str) -> Example:
    """The record's ids and labels; DatasetError if the reference's masking would drop it or it does not fit."""
    prompt = conversation_text(record.turns)
    input_ids = tokenize_with_image(prompt, tokenizer)
    labels, accounted, total = reference_labels(prompt, input_ids, tokenizer)
    if accounted != total:
        raise DatasetError(path, f"its turns do not split into rounds as the v1 template writes them ({accounted} "
                                 f"of {total} tokens accounted for: does a turn contain {STOP_STR!r} or "
                                 f"{ANSWER_SEP.strip()!r}?)", record.index, record.record_id)
    length = len(input_ids) - 1 + image_tokens
    if length > context:
        raise DatasetError(path, f"{length} positions ({image_tokens} image tokens and {len(input_ids) - 1} text "
                                 f"tokens) do not fit in the decoder's context of {context}: shorten its turns",
                           record.index, record.record_id)
    if all(label == IGNORE_INDEX for label in labels):
        raise DatasetError(path, "no answer token to learn", record.index, record.record_id)
    return Example(record, input_ids, labels)


def load_examples(path: str | Path, tokenizer: Tokenizer, image_tokens: int, context: int,
                  image_folder: str | Path | None = None) -> list[Example]:
    """read_dataset then encode every record: the whole file is checked before training starts."""
    return [encode(r, tokenizer, image_tokens, context, path) for r in read_dataset(path, image_folder)]
