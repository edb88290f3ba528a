"""The road-scene generator: reproducible, and its ground truth is consistent and unambiguous."""
from __future__ import annotations

import numpy as np

from mobilevlm_ros.demo.scenes import (BOX_COLORS, CAR_COLORS, CLASSES, COUNTED_CLASSES, FRAME_SIZES,
                                       POSITION_MARGIN, QUESTION_TYPES, answer_matches, caption_classes,
                                       caption_for, make_scene)
from mobilevlm_ros.model.image import preprocess
from mobilevlm_ros.model.prompt import build_prompt, tokenize_with_image

SCENES = [make_scene(7, i, labels=True) for i in range(40)]


def test_same_seed_and_index_give_the_same_scene():
    a, b = make_scene(3, 5, labels=True), make_scene(3, 5, labels=True)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.objects == b.objects and a.qa == b.qa and a.caption == b.caption
    c = make_scene(4, 5)
    assert not (c.image.shape == a.image.shape and np.array_equal(c.image, a.image))


def test_frames_are_rgb_uint8_of_the_listed_sizes():
    for s in SCENES:
        assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
        assert (s.image.shape[1], s.image.shape[0]) in FRAME_SIZES
    assert make_scene(1, 1, size=(500, 300)).image.shape == (300, 500, 3)


def test_objects_lie_inside_the_frame_and_never_overlap():
    for s in SCENES:
        h, w = s.image.shape[:2]
        for i, o in enumerate(s.objects):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            for p in s.objects[i + 1:]:
                assert x1 <= p.box[0] or p.box[2] <= x0 or y1 <= p.box[1] or p.box[3] <= y0, (o, p)


def test_label_map_draws_each_object_inside_its_box():
    for s in SCENES:
        for i, o in enumerate(s.objects):
            ys, xs = np.nonzero(s.labels == i + 1)
            assert len(xs) > 20, o
            assert xs.min() >= o.box[0] - 1 and xs.max() < o.box[2] + 1
            assert ys.min() >= o.box[1] - 1 and ys.max() < o.box[3] + 1
        assert s.labels.max() == len(s.objects)


def test_answers_follow_from_the_objects():
    seen = set()
    for s in SCENES:
        w = s.image.shape[1]
        by_class = {c: [o for o in s.objects if o.cls == c] for c in CLASSES}
        for qa in s.qa:
            seen.add(qa.kind)
            objs = by_class.get(qa.subject, [])
            if qa.kind == "count":
                assert qa.subject in COUNTED_CLASSES and qa.answer == str(len(objs))
            elif qa.kind == "presence":
                assert qa.answer == ("yes" if objs else "no")
            elif qa.kind == "color":
                assert len(objs) == 1 and qa.answer == objs[0].color
                assert qa.answer in (CAR_COLORS if qa.subject == "car" else BOX_COLORS)
            elif qa.kind == "light":
                assert len(objs) == 1 and qa.answer == objs[0].state in ("red", "green")
            elif qa.kind == "position":
                assert len(objs) == 1
                x = objs[0].center_x / w
                assert abs(x - 0.5) > POSITION_MARGIN and qa.answer == ("left" if x < 0.5 else "right")
            else:
                assert qa.kind == "caption" and qa.answer == s.caption
            assert len(qa.answer.split()) == 1 or qa.kind == "caption"
        assert {"count", "presence", "caption"} <= {qa.kind for qa in s.qa}
    assert seen == set(QUESTION_TYPES) | {"caption"}


def test_caption_names_exactly_the_classes_present():
    for s in SCENES:
        assert caption_classes(s.caption) == {o.cls for o in s.objects}
    assert caption_for([]) == "An empty road."


def test_answer_matching_is_exact_up_to_case_and_a_full_stop():
    assert answer_matches(" Red.", "red") and answer_matches("3", "3")
    assert not answer_matches("3 cones", "3") and not answer_matches("re", "red")


def test_training_pixels_are_the_pipeline_pixels():
    from mobilevlm_ros.train.data import normalize, square_pixels

    for s in SCENES[:4]:
        ours = normalize(square_pixels(s.image)[None])
        assert np.array_equal(ours, preprocess(s.image).numpy())


def test_training_blocks_tokenize_like_inference_prompts(tmp_path):
    from mobilevlm_ros.model.tokenizer import Tokenizer
    from mobilevlm_ros.train.recipe import BlockEncoder
    from mobilevlm_ros.train.text import corpus, train_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(train_tokenizer(corpus(SCENES, 0), 512))
    tok = Tokenizer(tmp_path / "tokenizer.model")
    enc = BlockEncoder(tok)
    for qa in SCENES[0].qa:
        ids, flags = enc.block(qa.question, qa.answer)
        prompt = tokenize_with_image(build_prompt([qa.question]), tok)
        assert enc.prefix + [-200] + ids[: flags.index(True)] == prompt  # the pipeline's prompt, then the answer
        answer = ids[flags.index(True):]
        assert all(flags[flags.index(True):]) and answer[-1] == tok.eos_id
        assert tok.decode(answer[:-1]).strip() == qa.answer
