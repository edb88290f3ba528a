"""LoRA fine-tuning (mobilevlm_ros.finetune) on the tiny reference checkpoint: the training objective against the
reference's (transformers' LlamaForCausalLM with the reference's labels), the adapter against PEFT, bad input, and
mobilevlm bag-to-dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CHECKPOINTS, REFERENCE

from mobilevlm_ros.finetune import bag_to_dataset as bag_tool
from mobilevlm_ros.finetune import cli
from mobilevlm_ros.finetune.data import IGNORE_INDEX, load_examples, read_dataset
from mobilevlm_ros.finetune.lora import LoraSettings, merge_adapter
from mobilevlm_ros.finetune.train import FinetuneSettings, example_loss, finetune
from mobilevlm_ros.model import load_model
from mobilevlm_ros.model.mobilevlm import IMAGE_TOKEN_INDEX

TINY = CHECKPOINTS / "MobileVLM_V2-tiny"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
RECORDS = [
    {"id": "street", "image": "street.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in front of the robot?"},
        {"from": "gpt", "value": "A street with two parked cars."},
        {"from": "human", "value": "Is it safe to cross?"},
        {"from": "gpt", "value": "No, wait for the light."}]},
    {"id": "robot", "image": "robot.png", "conversations": [  # the image marker last: moved to the front
        {"from": "human", "value": "Describe the robot. <image>"}, {"from": "gpt", "value": "A small grey robot."}]},
    {"id": "sign", "image": "sign.png", "conversations": [  # a leading gpt turn: skipped, as the reference does
        {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "<image>\nRead the sign."},
        {"from": "gpt", "value": "It says STOP 42."}]},
]


def write_dataset(directory: Path, records=RECORDS) -> Path:
    for name, source in (("street.png", "img0_street_500x300_rgb.png"), ("robot.png", "img1_robot_240x420_rgba.png"),
                         ("sign.png", "img2_sign_237x151_gray.png")):
        Image.open(REFERENCE / "images" / source).save(directory / name)
    path = directory / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# --- the reference's data code, transcribed (Meituan-AutoML/MobileVLM mobilevlm/utils.py, conversation.py and
# mobilevlm/train/train.py; tokenize(text) stands for the slow LlamaTokenizer's tokenizer(text).input_ids, which
# the package's Tokenizer reproduces, test_tokenizer.py) ---

def tokenizer_image_token(prompt, tokenize, bos_id):
    prompt_chunks = [tokenize(chunk) for chunk in prompt.split('<image>')]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == bos_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def reference_preprocess(conversations, tokenize, bos_id, pad_id):
    """preprocess_multimodal + preprocess_v1 for one record: (input_ids, labels)."""
    source = [dict(s) for s in conversations]
    for sentence in source:
        if '<image>' in sentence['value']:
            sentence['value'] = sentence['value'].replace('<image>', '').strip()
            sentence['value'] = '<image>' + '\n' + sentence['value']
            sentence['value'] = sentence['value'].strip()
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    if roles[source[0]["from"]] != "USER":
        source = source[1:]
    seps = [" ", "</s>"]
    conversation = SYSTEM + seps[0]
    for i, sentence in enumerate(source):
        conversation += roles[sentence["from"]] + ": " + sentence["value"] + seps[i % 2]
    input_ids = torch.tensor(tokenizer_image_token(conversation, tokenize, bos_id))
    target = input_ids.clone()
    sep = " " + "ASSISTANT" + ": "
    total_len = int(target.ne(pad_id).sum())
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tokenize, bos_id))
        instruction_len = len(tokenizer_image_token(parts[0], tokenize, bos_id)) - 2
        target[cur_len: cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    assert cur_len == total_len
    return input_ids, target


def reference_loss(hf_model, embed_tokens, records, image_features, tokenizer):
    """prepare_inputs_labels_for_multimodal (one image per record, right padding with zeros / IGNORE_INDEX /
    attention False) and LlamaForCausalLM's loss."""
    embeds, labels = [], []
    for record, features in zip(records, image_features):
        input_ids, target = reference_preprocess(record["conversations"], tokenizer.encode, tokenizer.bos_id,
                                                 tokenizer.unk_id)
        at = int(torch.where(input_ids == IMAGE_TOKEN_INDEX)[0][0])
        embeds.append(torch.cat([embed_tokens(input_ids[:at]), features, embed_tokens(input_ids[at + 1:])]))
        labels.append(torch.cat([target[:at], torch.full((features.shape[0],), IGNORE_INDEX), target[at + 1:]]))
    length = max(e.shape[0] for e in embeds)
    mask = torch.stack([torch.arange(length) < e.shape[0] for e in embeds])
    embeds = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
    labels = torch.stack([torch.cat([t, t.new_full((length - t.shape[0],), IGNORE_INDEX)]) for t in labels])
    return hf_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def hf_llama(model_dir: Path):
    """transformers' LlamaForCausalLM with the checkpoint's decoder weights (float32, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    config = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                         intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                         num_attention_heads=cfg["num_attention_heads"],
                         num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
                         max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    weights = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    decoder = {k: v for k, v in weights.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
    missing, unexpected = model.load_state_dict(decoder, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    model.config._attn_implementation = "eager"
    return model.eval()


def image_features(model, records, directory: Path):
    from mobilevlm_ros.finetune.train import pixel_values

    with torch.no_grad():
        return [model.encode_images(pixel_values(model, directory / r["image"]))[0] for r in records]


def test_loss_equals_llama_for_causal_lm_with_the_reference_labels(tmp_path):
    """The ids and labels of a fixed batch (multi-turn, an image marker to move, a leading gpt turn to skip) are
    exactly the reference's preprocess_v1 output, and our training loss of the batch equals transformers'
    LlamaForCausalLM loss on the same weights, inputs_embeds and reference labels within 1e-5 (float32)."""
    path = write_dataset(tmp_path)
    model, tokenizer = load_model(TINY)
    examples = load_examples(path, tokenizer, model.config.image_tokens, 2048)
    for example, record in zip(examples, RECORDS):
        ids, labels = reference_preprocess(record["conversations"], tokenizer.encode, tokenizer.bos_id,
                                           tokenizer.unk_id)
        assert example.input_ids == ids.tolist() and example.labels == labels.tolist(), record["id"]
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"][-2 if record["id"] == "street"
                                                                                        else -1:]
        learnt = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)
        assert learnt.replace(" ", "") == "</s>".join(answers).replace(" ", "") + "</s>", learnt
    with torch.no_grad():
        ours = example_loss(model, examples)
        hf = hf_llama(TINY)
        theirs = reference_loss(hf, hf.model.embed_tokens, RECORDS, image_features(model, RECORDS, tmp_path),
                                tokenizer)
    assert ours.dtype == theirs.dtype == torch.float32
    assert abs(float(ours) - float(theirs)) < 1e-5, (float(ours), float(theirs))


def test_adapter_is_peft_layout_and_merged_checkpoint_matches_peft(tmp_path):
    """A short fine-tune writes adapter_config.json + adapter_model.safetensors that PEFT loads onto
    LlamaForCausalLM as they are; PEFT's loss with that adapter equals ours with the adapter merged (from the
    adapter directory, and from the merged checkpoint through the loader) within 1e-5."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = write_dataset(tmp_path)
    settings = FinetuneSettings(lora=LoraSettings(r=4, alpha=8.0), learning_rate=5e-2, batch_size=3, epochs=4,
                                gradient_checkpointing=True)
    result = finetune(TINY, path, tmp_path / "out", settings, merge=True, log=lambda line: None)
    out = result.out_dir
    assert result.steps == 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8.0,
                                                                                          "CAUSAL_LM")
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 7 * 2
    projector = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert set(projector) == {f"base_model.model.model.mm_projector.{n}" for n in
                              ("mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias",
                               "peg.peg.0.weight", "peg.peg.0.bias")}

    model, tokenizer = load_model(TINY)
    merge_adapter(model, out)
    examples = load_examples(path, tokenizer, model.config.image_tokens, 2048)
    merged_ckpt, _ = load_model(out / "merged")
    with torch.no_grad():
        ours = example_loss(model, examples)
        from_checkpoint = example_loss(merged_ckpt, examples)
        peft_model = PeftModel.from_pretrained(hf_llama(TINY), str(out)).eval()
        theirs = reference_loss(peft_model, peft_model.base_model.model.model.embed_tokens, RECORDS,
                                image_features(model, RECORDS, tmp_path), tokenizer)
    base, _ = load_model(TINY)
    with torch.no_grad():
        untrained = example_loss(base, examples)
    assert float(ours) < float(untrained)  # the adapter changed something
    assert abs(float(ours) - float(theirs)) < 1e-5, (float(ours), float(theirs))
    assert torch.equal(ours, from_checkpoint)


@pytest.mark.parametrize("case", ["missing image", "malformed JSON", "no image marker", "longer than the context"])
def test_bad_input_names_the_record_and_writes_nothing(tmp_path, capsys, case):
    """Each kind of bad training data stops mobilevlm finetune before training with exit code 2 and a message
    naming the file and the record, and leaves nothing in (or beside) --out."""
    records = json.loads(json.dumps(RECORDS))
    expected = {"missing image": "record 1 (id 'robot'): image",
                "malformed JSON": "not valid JSON",
                "no image marker": "record 2 (id 'sign'): no <image> in any turn",
                "longer than the context": "record 0 (id 'street'):"}[case]
    if case == "missing image":
        records[1]["image"] = "nowhere.png"
    if case == "no image marker":
        records[2]["conversations"][1]["value"] = "Read the sign."
    if case == "longer than the context":
        records[0]["conversations"][3]["value"] = "wait " * 2100
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = write_dataset(data_dir, records)
    if case == "malformed JSON":
        path.write_text(json.dumps(records)[:-7], encoding="utf-8")
    out = tmp_path / "out"
    rc = cli.main(["--model", str(TINY), "--data", str(path), "--out", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and str(path) in err, err
    if case == "longer than the context":
        assert "do not fit in the decoder's context of 2048" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_empty_answers_are_refused_naming_the_record(tmp_path):
    records = json.loads(json.dumps(RECORDS))
    records[1]["conversations"][1]["value"] = ""
    with pytest.raises(ValueError, match=r"record 1 \(id 'robot'\): an empty gpt turn"):
        read_dataset(write_dataset(tmp_path, records))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_to_dataset_samples_frames_at_the_rate_with_labels(tmp_path, capsys, storage):
    """Frames of one camera topic are taken at most --rate per second of bag time into lossless PNGs and one
    record per question, answers from the labels file (left empty for a frame it does not list); the result reads
    as training data once every answer is filled in."""
    from mobilevlm_ros.bags import CameraFrame, write_camera_bag

    rng = np.random.default_rng(0)
    t0 = 1_700_000_000 * 10**9
    frames = [CameraFrame("/front/image_raw", t0 + i * 10**8, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
              for i in range(20)]  # 10 Hz for 2 s
    frames += [CameraFrame("/rear/image_raw/compressed", t0 + i * 10**8, frames[i].rgb, compressed=True)
               for i in range(20)]
    bag = write_camera_bag(tmp_path / "bag", frames, storage=storage)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({f"frame_{i:05d}": ["yes" if i % 2 else "no", str(i)] for i in range(3)}))
    questions = ["Is the road wet?", "How many cones are there?"]
    argv = [str(bag), "--topic", "/front/image_raw", "--rate", "2", "--question", questions[0], "--question",
            questions[1], "--labels", str(labels)]
    assert bag_tool.main(argv + ["--out", str(tmp_path / "ds")]) == 0
    assert "8 records from 4 frames; 2 answers to fill in" in capsys.readouterr().out
    records = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert [r["stamp_ns"] for r in records[::2]] == [t0 + k * 5 * 10**8 for k in range(4)]
    for k in range(4):
        saved = np.asarray(Image.open(tmp_path / "ds" / records[2 * k]["image"]))
        assert np.array_equal(saved, frames[5 * k].rgb)
    assert [r["conversations"][0]["value"] for r in records[:2]] == ["<image>\n" + q for q in questions]
    assert [r["conversations"][1]["value"] for r in records] == ["no", "0", "yes", "1", "no", "2", "", ""]
    with pytest.raises(ValueError, match=r"record 6 \(id 'frame_00003-0'\): an empty gpt turn"):
        read_dataset(tmp_path / "ds" / "dataset.json")
    assert set(json.loads((tmp_path / "ds" / "labels_template.json").read_text())) == {
        f"frame_{i:05d}" for i in range(4)}

    assert bag_tool.main([str(bag), "--topic", "/rear/image_raw/compressed", "--rate", "100", "--question", "Q?",
                          "--out", str(tmp_path / "rear")]) == 0
    assert len(json.loads((tmp_path / "rear" / "dataset.json").read_text())) == 20
    assert bag_tool.main([str(bag), "--topic", "/nope", "--question", "Q?", "--out", str(tmp_path / "x")]) == 2
    assert "no topic '/nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()
