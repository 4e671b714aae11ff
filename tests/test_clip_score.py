"""CLIP score with a random tiny open_clip model (a config written here, weights saved as safetensors):
fastdiff's tensor preprocessing and pairing against open_clip's own PIL pipeline, the stated convention,
the CLI on images and on a class-conditional model sampled on the fly, and clear errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.errors import FastdiffError

from conftest import TINY_CLIP_NAME as NAME  # noqa: E402 - the tiny_clip fixture lives in conftest


def test_scores_match_open_clip_pipeline(tiny_clip):
    import open_clip

    from fastdiff.evaluation.clip_score import ClipScorer

    config, weights = tiny_clip
    scorer = ClipScorer(NAME, weights, config)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(NAME)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    prompts = ["a shoe", "a bag", "a shirt"]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]))
        txt = model.encode_text(tokenizer(prompts))
        expected = torch.nn.functional.cosine_similarity(img, txt)
    got = scorer.cosines(torch.from_numpy(images).permute(0, 3, 1, 2), prompts)
    # Cosines (|.| <= 1) of the same tiny CLIP on pixels normalised in another order (a rounding of each input): the
    # two one-layer towers carry that through a few hundred float32 roundings of values of order 1; 1e-5 is ~80
    # eps32 of the cosine (measured 6e-8).
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The stated convention: torchmetrics' 100 * max(cos, 0); "cosine" is the raw value (the bound above x 100,
    # measured 7.6e-6).
    torch.testing.assert_close(scorer.scores(torch.from_numpy(images).permute(0, 3, 1, 2), prompts),
                               100 * expected.clamp(min=0), atol=1e-3, rtol=1e-5)


# Measured before the fix (max |difference| in uint8 levels after undoing the normalisation): 28x28 (upscaled) 13.5,
# 64x64 (downscaled) 3.2, 40x54 / 40x56 / 17x23 (cropped) 170-185: open_clip's Resize truncates the long side
# (int(32 * 56 / 40) = 44, not round's 45) and CenterCrop rounds its offset (round(11 / 2) = 6, not 5), and PIL
# resizes in uint8. torchvision's resize + center_crop on uint8 tensors (bicubic, antialias) are within 1 level
# of PIL on every size here, so that is the tolerance: 1 uint8 level, plus float32 rounding of the normalisation.
@pytest.mark.parametrize("size", [(28, 28), (64, 64), (40, 54), (40, 56), (17, 23), (100, 70)])
def test_preprocessing_matches_open_clip_transform_at_other_sizes(tiny_clip, size):
    import open_clip

    from fastdiff.evaluation.clip_score import ClipScorer

    config, weights = tiny_clip
    scorer = ClipScorer(NAME, weights, config)
    _, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=weights)
    images = np.random.default_rng(size[0] * size[1]).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    expected = torch.stack([preprocess(Image.fromarray(i)) for i in images])
    got = scorer.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert got.shape == expected.shape == (2, 3, 32, 32)
    levels = ((got - expected) * scorer.std * 255).abs().max()
    assert levels <= 1 + 1e-3, float(levels)


def test_grayscale_and_resize(tiny_clip):
    from fastdiff.evaluation.clip_score import ClipScorer

    config, weights = tiny_clip
    scorer = ClipScorer(NAME, weights, config, convention="cosine")
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    x = scorer.preprocess(gray)
    assert x.shape == (2, 3, 32, 32)
    cos = scorer.scores(gray, ["a", "b"])
    assert cos.shape == (2,) and (cos.abs() <= 1).all()


def test_prompt_pairing():
    from fastdiff.evaluation.clip_score import prompts_for

    assert prompts_for(["a"], 3) == ["a", "a", "a"]
    assert prompts_for(["a", "b"], 5, num_classes=2) == ["a", "b", "a", "b", "a"]
    with pytest.raises(FastdiffError, match="give 5"):
        prompts_for(["a", "b", "c"], 5)


def test_cli_clip_score_on_images_and_a_class_conditional_model(tiny_clip, tmp_path, capsys, tiny_cond_teacher):
    config, weights = tiny_clip
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "one.txt").write_text("a photo\n")
    common = ["--clip-model", NAME, "--clip-config", config, "--clip-weights", weights, "--device", "cpu"]
    assert main(["clip-score", str(folder), "--prompts", str(tmp_path / "one.txt"), "--json", str(tmp_path / "c.json"),
                 *common]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["clip_score_label"] == f"CLIPScore@4({NAME}, 100*max(cos,0))" and result["n"] == 4
    assert capsys.readouterr().out.startswith(f"CLIPScore@4({NAME}, 100*max(cos,0)) = ")

    from fastdiff.models.teacher import load_teacher

    classes = load_teacher(tiny_cond_teacher).num_classes
    (tmp_path / "classes.jsonl").write_text("\n".join(json.dumps({"prompt": f"class {k}"}) for k in range(classes)))
    assert main(["clip-score", tiny_cond_teacher, "--prompts", str(tmp_path / "classes.jsonl"), "--steps", "1",
                 "--num", "5", "--convention", "cosine", "--json", str(tmp_path / "m.json"), *common]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n"] == 5 and result["convention"] == "cosine" and -1 <= result["clip_score"] <= 1


def test_clip_bad_inputs(tiny_clip, tmp_path, capsys):
    import pickle

    config, _ = tiny_clip
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "0.png")
    (tmp_path / "p.txt").write_text("x\n")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"x": Payload()}))
    cases = {
        "no weights": ([], "--clip-weights"),
        "missing weights file": (["--clip-weights", str(tmp_path / "none.safetensors")], "no such file"),
        "unknown model": (["--clip-model", "no-such-clip", "--clip-weights", str(tmp_path / "p.txt")], "unknown open_clip model"),
        "pickle payload": (["--clip-weights", str(tmp_path / "evil.bin")], "could not load CLIP"),
        "missing prompts": (["--prompts", str(tmp_path / "none.txt")], "no such file"),
    }
    for name, (extra, message) in cases.items():
        argv = ["clip-score", str(folder), "--prompts", str(tmp_path / "p.txt"), "--clip-model", NAME,
                "--clip-config", config, *extra]
        code = main(argv)
        err = capsys.readouterr()
        assert code == 2, (name, err)
        assert message in err.err and len(err.err.strip().splitlines()) == 1, (name, err.err)
        assert "payload ran" not in err.out
    assert not marker.exists()
