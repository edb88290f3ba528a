"""mobilevlm ask's handling of expected problems: a clear message on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import CHECKPOINTS, REFERENCE, golden_cases

MODEL = str(CHECKPOINTS / "MobileVLM_V2-tiny")
IMAGE = str(REFERENCE / "images" / "img0_street_500x300_rgb.png")


def ask(*args: str, tmp_path=None, env: dict | None = None):
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.cli.ask", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=None if env is None else {**os.environ, **env})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("kernels", [[], ["--no-onednn"]])  # oneDNN (the default on x86) or torch's MKL kernels
def test_streams_plain_text_answer(kernels):
    proc = ask("--model", MODEL, "--image", IMAGE, "--max-new-tokens", "16", *kernels,
               "What is the robot doing on the street?")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "hree�llows0unda� scenellows0unda� scenellows0unda�"  # the reference's answer


def test_home_and_environment_variables_in_paths_are_expanded(tmp_path):
    """--model, --vision-tower, --image and --chat given as `~/...` and `$VARS` that no shell expanded: HOME is a
    temp directory holding a link to a V1 checkpoint (its CLIP directory not next to it) and the chat file."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "v1").symlink_to(CHECKPOINTS / "MobileVLM-tiny-v1", target_is_directory=True)
    case = next(c for c in golden_cases("MobileVLM-tiny-v1") if len(c["turns"]) > 1)
    (home / "chat.json").write_text(json.dumps(case["turns"]))
    env = {"HOME": str(home), "CLIP": str(CHECKPOINTS / "tiny-clip-vit-patch14-336"), "REFERENCE": str(REFERENCE)}
    proc = ask("--model", "~/models/v1", "--vision-tower", "$CLIP", "--image", f"$REFERENCE/{case['image']}",
               "--chat", "~/chat.json", "--max-new-tokens", str(len(case["generated_ids"])), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["generated_ids"] == case["generated_ids"]


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "int4"])
def test_quantized_decoder_answers(mode):
    """--quantize replaces every Linear layer of the decoder (quantize.py); the tiny reference model still answers
    (its random weights make the words meaningless either way)."""
    proc = ask("--model", MODEL, "--image", IMAGE, "--quantize", mode, "--max-new-tokens", "8", "--json", "q")
    assert proc.returncode == 0, proc.stderr
    assert 1 <= len(json.loads(proc.stdout)["generated_ids"]) <= 8


@pytest.mark.parametrize("args,message", [
    (["--model", MODEL, "--image", "/nonexistent.png", "q"], "cannot read image /nonexistent.png"),
    (["--model", MODEL, "--image", str(REFERENCE / "README.md"), "q"], "cannot read image"),
    (["--model", "/nonexistent", "--image", IMAGE, "q"], "/nonexistent: model directory not found"),
    (["--model", MODEL, "--image", IMAGE], "give a QUESTION or --chat FILE"),
    (["--model", MODEL, "--image", IMAGE, "--temperature", "-1", "q"], "temperature must be a finite number >= 0"),
    (["--model", MODEL, "--image", IMAGE, "--dtype", "int3", "q"], "invalid choice: 'int3'"),
    (["--model", MODEL, "--image", IMAGE, "--max-seq-len", "160", "q"], "context holds 160"),
    (["--model", MODEL, "--image", IMAGE, "--chat", "/nonexistent.json"], "cannot read --chat file"),
    (["--model", MODEL, "--image", IMAGE, "--choice", "yes", "--choice", "yes", "q"], "choice 'yes' is given twice"),
    (["--model", MODEL, "--image", IMAGE, "--choice", "yes", "--choice", " ", "q"], "a choice is empty"),
    (["--model", MODEL, "--image", IMAGE, "--choice", "yes", "--temperature", "0.5", "q"],
     "--temperature 0.5 with --choice: choices are scored, not sampled"),
])
def test_errors_are_reported_cleanly(args, message):
    proc = ask(*args)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_bad_chat_files(tmp_path):
    for content, message in (("not json", "not valid JSON"), ('["q", "a"]', "ending with a user turn"),
                             ('{"q": 1}', "JSON list of strings")):
        chat = tmp_path / "chat.json"
        chat.write_text(content)
        proc = ask("--model", MODEL, "--image", IMAGE, "--chat", str(chat))
        assert proc.returncode != 0 and message in proc.stderr


def test_several_images_one_batch_json_list_equals_each_alone(capsys):
    """--image given several times: the same question about each, in one batch; --json prints a list of the
    single-image objects in order, each what the command prints for that image alone (timings apart)."""
    from mobilevlm_ros.cli.ask import main

    case = golden_cases("MobileVLM_V2-tiny")[0]
    images = [str(p) for p in sorted((REFERENCE / "images").iterdir())]
    common = ["--model", MODEL, "--max-new-tokens", "16", "--json", case["turns"][0]]
    assert main([arg for path in images for arg in ("--image", path)] + common) == 0
    batch = json.loads(capsys.readouterr().out)
    assert isinstance(batch, list) and len(batch) == len(images)
    for path, got in zip(images, batch):
        assert main(["--image", path] + common) == 0
        alone = json.loads(capsys.readouterr().out)
        assert got.keys() == alone.keys()
        assert {k: v for k, v in got.items() if k != "timings"} == {k: v for k, v in alone.items() if k != "timings"}
        if path == str(REFERENCE / case["image"]):
            assert got["generated_ids"] == case["generated_ids"] and got["answer"] == case["output_text"]


def test_choices_answer_with_their_probabilities(tmp_path, capsys):
    """--choice A --choice B (the bundled demo model on a demo scene with pedestrians): the answer is the choice
    pipeline.choose gives, the right one, and --json prints choice_probabilities in the order given."""
    from mobilevlm_ros.cli.ask import main
    from mobilevlm_ros.demo import DEFAULT_MODEL_DIR
    from mobilevlm_ros.demo.scenes import make_scene
    from mobilevlm_ros.model import MobileVLMPipeline

    scene = next(s for s in (make_scene(20240, i) for i in range(100)) if s.count("pedestrian"))
    image = tmp_path / "scene.png"
    PILImage.fromarray(scene.image).save(image)
    question = "Is there a pedestrian on the road?"
    assert main(["--image", str(image), "--choice", "no", "--choice", "yes", "--json", question]) == 0
    printed = json.loads(capsys.readouterr().out)
    alone = MobileVLMPipeline.load(DEFAULT_MODEL_DIR).choose(np.asarray(PILImage.open(image)), question, ["no", "yes"])
    assert printed["answer"] == alone.answer == "yes" and printed["index"] == 1
    assert printed["choice_probabilities"] == pytest.approx(alone.probabilities, abs=1e-4)
    assert printed["choice_probabilities"][1] > 0.5 and sum(printed["choice_probabilities"]) == pytest.approx(1.0)
    assert main(["--image", str(image), "--choice", "no", "--choice", "yes", question]) == 0
    assert capsys.readouterr().out == "yes\n"


def test_several_images_plain_text_one_line_each():
    proc = ask("--model", MODEL, "--image", IMAGE, "--image", IMAGE, "--max-new-tokens", "16",
               "What is the robot doing on the street?")
    assert proc.returncode == 0
    answer = "hree�llows0unda� scenellows0unda� scenellows0unda�"  # the reference's answer, as streamed alone
    assert proc.stdout.splitlines() == [f"{IMAGE}: {answer}"] * 2


def test_one_command_dispatches_to_every_subcommand():
    """`mobilevlm` lists the runtime commands and the developer tools and runs each by name with its own options;
    an unknown name is refused with the list."""
    from mobilevlm_ros.cli.main import COMMANDS, DEV_TOOLS

    exe = [sys.executable, "-m", "mobilevlm_ros.cli.main"]
    listing = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    assert all(f"  {name}" in listing.stdout for name in COMMANDS)
    assert all(f"  dev {name}" in listing.stdout for name in DEV_TOOLS)
    for args, prog in ((["ask", "--help"], "usage: mobilevlm ask"), (["dev", "train-demo", "--help"],
                                                                       "usage: mobilevlm dev train-demo")):
        proc = subprocess.run([*exe, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(prog), proc.stderr
    unknown = subprocess.run([*exe, "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr
