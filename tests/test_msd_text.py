"""Multi-student distillation for text-to-image teachers (training/msd.py, pipelines/pipeline_fastdiff_multi_student.py):
the prompt clustering, the nearest-centroid router and its images against each student's own StableDiffusionPipeline,
`fastdiff sample` / the fid source on router folders, and the smaller student's teacher-score-matching warm-up."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from fastdiff.cli import main
from fastdiff.errors import FastdiffError
from fastdiff.evaluation.images import open_source
from fastdiff.pipelines.pipeline_fastdiff_multi_student import FastdiffMultiStudentTextPipeline, PromptRoutedStudents
from fastdiff.training.msd_text import check_prompt_partition, cluster_prompts, kmeans
from fastdiff.training.msd_warmup import teacher_score_matching

PROMPTS = ["a red shoe on a table", "a blue shoe on a table", "a red bag", "a green shirt", "zzzz qqqq", "xxxx zzzz",
           "a tiny red shoe", "qqqq xxxx zz"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    path = tp.sd_pipeline(tmp_path_factory.mktemp("msd-sd") / "sd")
    return str(path), StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def test_kmeans_is_deterministic_and_a_fixed_point():
    """Three blobs 20 standard deviations apart: found exactly, the same for the same seed; every row is assigned to
    its nearest centroid (distances recomputed here in numpy float64) and every centroid is its cluster's mean."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 5, [20.0] * 5, [-20.0, 20.0, -20.0, 20.0, -20.0]], dtype=torch.float64)
    truth = torch.arange(30) % 3
    x = centres[truth] + torch.randn(30, 5, generator=gen, dtype=torch.float64)
    assign, centroids = kmeans(x, 3, seed=4)
    again, same = kmeans(x, 3, seed=4)
    assert torch.equal(assign, again) and torch.equal(centroids, same)
    assert len(set(zip(truth.tolist(), assign.tolist()))) == 3  # each blob is one cluster
    xn, cn = x.numpy(), centroids.numpy()
    nearest = ((xn[:, None, :] - cn[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(nearest, assign.numpy())
    for j in range(3):  # float64 means of <= 30 rows of magnitude <= 21: rounding ~1e-16 x 21 x 30, far below 1e-9
        assert np.abs(xn[nearest == j].mean(0) - cn[j]).max() < 1e-9
    with pytest.raises(FastdiffError, match="distinct"):
        kmeans(torch.ones(4, 3, dtype=torch.float64), 2, seed=0)


def test_prompt_clusters_are_deterministic_and_cover_the_prompts(sd):
    _, pipe = sd
    prompts = PROMPTS + PROMPTS[:2]  # repeats stay (their weight in training), each in its prompt's cluster
    parts = cluster_prompts(pipe, prompts, 3, seed=0)
    assert parts == cluster_prompts(pipe, prompts, 3, seed=0)
    assert sorted(p for part in parts for p in part) == sorted(prompts) and all(parts)
    check_prompt_partition(parts)
    with pytest.raises(FastdiffError, match="between 1 and the 8 distinct prompts"):
        cluster_prompts(pipe, prompts, 9, seed=0)
    with pytest.raises(FastdiffError, match="is in the parts of students 0 and 1"):
        check_prompt_partition([["a", "b"], ["b"]])


def _student_unet(pipe, seed):
    """Another UNet of the teacher's architecture (random weights of its own seed): a student that visibly differs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(pipe.unet.config).eval()


def _text_router(pipe, tmp_path, parts):
    """Two students (the teacher's UNet and another) behind a router whose centroids are their parts' mean features,
    saved and reloaded; and each student as its own StableDiffusionPipeline folder, reloaded."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fastdiff.training.msd_text import text_features

    unets = [pipe.unet, _student_unet(pipe, 3)]
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    configs = [{"_class_name": "UNet2DConditionModel", **{k: v for k, v in u.config.items() if not k.startswith("_")}}
               for u in unets]
    model = PromptRoutedStudents(students=configs, feature_dim=32)
    for net, unet in zip(model.nets, unets):
        net.load_state_dict(unet.state_dict())
    model.centroids.copy_(torch.stack([text_features(pipe, part).mean(0) for part in parts]))
    parts_ = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=scheduler)
    FastdiffMultiStudentTextPipeline(students=model, **parts_).save_pretrained(tmp_path / "router")
    own = []
    for k, unet in enumerate(unets):
        StableDiffusionPipeline(unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                **parts_).save_pretrained(tmp_path / f"own-{k}")
        own.append(StableDiffusionPipeline.from_pretrained(tmp_path / f"own-{k}"))
    return FastdiffMultiStudentTextPipeline.from_pretrained(tmp_path / "router"), own


def _uint8(images):
    return (np.asarray(images) * 255).round().astype(np.uint8)


def test_text_router_routes_to_the_nearest_centroid_and_equals_each_student(sd, tmp_path):
    from safetensors.torch import load_file

    _, pipe = sd
    parts = cluster_prompts(pipe, PROMPTS, 2, seed=0)
    router, own = _text_router(pipe, tmp_path, parts)
    files = sorted(p.name for p in (tmp_path / "router").rglob("*") if p.is_file())
    assert not any(f.endswith((".bin", ".py")) for f in files)
    # The nearest-centroid rule computed independently: the text encoder's last hidden state (the SD prompt
    # embedding) averaged over the padded tokens in float64, against the centroids read from the safetensors file.
    new = ["a red shoe", "zzzz", "a blue bag on a table", "qqqq", "shirt", "xxxx zzzz qqqq"] + PROMPTS
    ids = pipe.tokenizer(new, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        features = pipe.text_encoder(ids)[0].double().mean(1).numpy()
    centroids = load_file(str(tmp_path / "router" / "students" / "diffusion_pytorch_model.safetensors"))["centroids"]
    assert centroids.dtype == torch.float64 and centroids.shape == (2, 32)
    rule = ((features[:, None, :] - centroids.numpy()[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(router.route(new).numpy(), rule)
    assert set(rule.tolist()) == {0, 1}
    # Each training prompt is routed to its own cluster's student (k-means' fixed point).
    assert router.route(PROMPTS).tolist() == [0 if p in parts[0] else 1 for p in PROMPTS]

    def images(p, prompts, seed, steps=1):
        gen = torch.Generator().manual_seed(seed) if isinstance(seed, int) else [torch.Generator().manual_seed(s) for s in seed]
        return _uint8(p(prompts, num_inference_steps=steps, guidance_scale=0, generator=gen, output_type="np").images)

    for k in (0, 1):  # a batch routed to one student: that student's own pipeline's images, bit for bit
        batch = [p for p, r in zip(new, rule) if r == k][:3]
        assert np.array_equal(images(router, batch, 7), images(own[k], batch, 7))
    assert np.array_equal(images(router, batch, 8, steps=2), images(own[1], batch, 8, steps=2))  # LCM's re-noising
    # A mixed batch with one generator per image: each image is its student's, alone with that seed (uint8; the
    # sub-batch may round float32 kernels differently in the last bits, far below 1/255).
    mixed, seeds = new[:4], [11, 12, 13, 14]
    assert set(rule[:4].tolist()) == {0, 1}
    ours = images(router, mixed, seeds)
    for i, (prompt, seed) in enumerate(zip(mixed, seeds)):
        assert np.array_equal(ours[i], images(own[rule[i]], [prompt], [seed])[0])
    # A mixed batch with one generator: the whole batch's first noise drawn as one pipeline draws it, each student
    # run on its rows of it (uint8, as above).
    ours = images(router, mixed, 21)
    noise = torch.randn((4, 4, tp.LATENT, tp.LATENT), generator=torch.Generator().manual_seed(21))
    for k in (0, 1):
        rows = [i for i in range(4) if rule[i] == k]
        theirs = own[k]([mixed[i] for i in rows], latents=noise[rows], num_inference_steps=1, guidance_scale=0,
                        output_type="np").images
        assert np.array_equal(ours[rows], _uint8(theirs))
    # num_images_per_prompt 2 on a mixed batch (it once crashed: noise drawn per prompt, not per image): the images in
    # the pipeline's order (each prompt's two together), each its student's on its rows of the batch's noise, and with
    # one generator per image, each image its student's alone with that seed.
    ours = _uint8(router(mixed, num_images_per_prompt=2, num_inference_steps=1, guidance_scale=0,
                         generator=torch.Generator().manual_seed(22), output_type="np").images)
    noise = torch.randn((8, 4, tp.LATENT, tp.LATENT), generator=torch.Generator().manual_seed(22))
    for k in (0, 1):
        prompts_k = [i for i in range(4) if rule[i] == k]
        rows = [2 * i + j for i in prompts_k for j in (0, 1)]
        theirs = own[k]([mixed[i] for i in prompts_k], num_images_per_prompt=2, latents=noise[rows],
                        num_inference_steps=1, guidance_scale=0, output_type="np").images
        assert np.array_equal(ours[rows], _uint8(theirs))
    seeds = list(range(30, 38))
    ours = _uint8(router(mixed, num_images_per_prompt=2, num_inference_steps=1, guidance_scale=0,
                         generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images)
    for r, seed in enumerate(seeds):
        assert np.array_equal(ours[r], images(own[rule[r // 2]], [mixed[r // 2]], [seed])[0])
    with pytest.raises(ValueError, match="give one per image"):
        router(mixed, num_images_per_prompt=2, generator=[torch.Generator() for _ in range(4)])
    assert not np.array_equal(images(own[0], mixed[:1], 5), images(own[1], mixed[:1], 5))  # the routing is seen


def test_sample_and_fid_source_load_a_class_router(tmp_path):
    """`fastdiff sample` and the model source behind `fastdiff fid` sample a class router folder through its
    pipeline: batch b with seed + b and labels start, start + 1, ... mod the classes."""
    from test_msd import _router

    router, _ = _router(tmp_path)
    (tmp_path / "router" / "fastdiff.json").write_text(json.dumps({"format": "fastdiff-msd-v1", "num_classes": 3,
                                                                   "num_steps": 1}))
    out = tmp_path / "pngs"
    assert main(["sample", str(tmp_path / "router"), "--num", "5", "--steps", "1", "--batch-size", "3",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    from PIL import Image

    written = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(5)])
    expected = np.concatenate([
        _uint8(router(class_labels=labels, generator=torch.Generator().manual_seed(seed), output_type="np").images)
        for labels, seed in (([0, 1, 2], 0), ([0, 1], 1))])
    assert np.array_equal(written, expected[..., 0])
    source = open_source(str(tmp_path / "router"), steps=1, seed=0, device="cpu")
    assert source.is_model and source.num_classes == 3 and source.shape == (1, 8, 8)
    got = torch.cat(list(source.batches(5, 3)))
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), expected)
    # process 1 of 2 (`fastdiff fid` launched on two): the second batch only, the same images as alone
    assert np.array_equal(torch.cat(list(source.batches(5, 3, part=(1, 2)))).permute(0, 2, 3, 1).numpy(),
                          expected[3:])
    assert main(["sample", str(tmp_path / "router"), "--num", "1", "--steps", "1", "--out", str(tmp_path / "x"),
                 "--guidance-scale", "2", "--quiet"]) == 2


def test_warm_up_lowers_the_regression_error_and_is_deterministic(tiny_cond_teacher, tmp_path):
    """Teacher score matching on a smaller student (half the channels, no attention) of the tiny class-conditional
    teacher: 12 updates lower the held-out regression error (measured 0.297 -> 0.123), and the same call from the
    same start gives the same weights bit for bit (every draw from seeded generators)."""
    from diffusers import UNet2DModel

    from fastdiff.models.teacher import load_model, load_teacher

    torch.manual_seed(6)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, num_class_embeds=4).save_pretrained(tmp_path / "small")
    teacher = load_teacher(tiny_cond_teacher)
    runs = []
    for steps in (3, 3, 12):
        model = load_model(str(tmp_path / "small")).requires_grad_(True)
        result = teacher_score_matching(teacher, model, steps, 3e-3, 4, 0, [0, 2], eval_batches=2, teacher_steps=2)
        runs.append((result, model.state_dict()))
    (first, weights), (again, weights2), (result, _) = runs
    assert first == again and all(torch.equal(weights[n], weights2[n]) for n in weights)
    assert result["error_after"] < 0.6 * result["error_before"], result  # measured 0.41 x


@pytest.mark.slow  # ~7 s on a loaded 2-core CPU
def test_warm_up_on_a_text_teacher(sd):
    """The warm-up on prompts: a quarter-size SD UNet (66.8k parameters against the teacher's 253k) regressing the
    tiny SD teacher on three prompts' embeddings, 12 updates: measured 0.221 -> 0.082."""
    from diffusers import UNet2DConditionModel

    from fastdiff.models.teacher import load_teacher

    torch.manual_seed(0)
    small = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=tp.LATENT, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=4, norm_num_groups=4)
    result = teacher_score_matching(load_teacher(sd[0]), small, 12, 3e-3, 4, 0, prompts=["a red shoe", "a blue bag",
                                    "zzzz"], eval_batches=2, teacher_steps=2)
    assert result["error_after"] < 0.6 * result["error_before"], result


@pytest.mark.slow  # ~25 s on a loaded 2-core CPU: two SD students trained and exported, the router, sampling
def test_msd_on_a_text_teacher_end_to_end(sd, tmp_path):
    """`fastdiff msd --partitions 2` on the tiny SD teacher: the prompts clustered as cluster_prompts does, one student
    per cluster trained on its prompts, the router's images for a one-cluster batch equal to that student's own
    exported StableDiffusionPipeline (uint8), and `fastdiff sample` / the fid source on the router folder."""
    from diffusers import StableDiffusionPipeline

    path, pipe = sd
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "msd"
    args = ["msd", "--partitions", "2", "--quiet"]
    for item in [f"teacher.path={path}", f"output_dir={out}", f"data.prompts={prompts}", "train.max_steps=2",
                 "train.batch_size=2", "train.checkpoint_every=100", "train.sample_every=100",
                 "objective.critic_updates=1", "train.lr_generator=1e-3", "train.ema_decay=0"]:
        args += ["--set", item]
    assert main(args) == 0
    parts = json.loads((out / "partition.json").read_text())
    assert parts == cluster_prompts(pipe, PROMPTS, 2, seed=0)
    assert json.loads((out / "router" / "partition.json").read_text()) == parts
    from test_text_to_image import run_model_card

    run_model_card(out / "router")  # the card's Python block runs from inside the folder
    router = FastdiffMultiStudentTextPipeline.from_pretrained(out / "router")
    assert router.route(PROMPTS).tolist() == [0 if p in parts[0] else 1 for p in PROMPTS]
    for k in (0, 1):
        own = StableDiffusionPipeline.from_pretrained(out / f"student-{k}" / "student")
        batch = parts[k][:2]
        call = dict(num_inference_steps=1, guidance_scale=0, output_type="np")
        assert np.array_equal(_uint8(router(batch, generator=torch.Generator().manual_seed(3), **call).images),
                              _uint8(own(batch, generator=torch.Generator().manual_seed(3), **call).images))
    # fastdiff sample on the router: batch b is the router's call with seed b on the batch's prompts.
    three = tmp_path / "three.txt"
    three.write_text("\n".join(PROMPTS[:3]) + "\n")
    assert main(["sample", str(out / "router"), "--num", "3", "--steps", "1", "--batch-size", "2", "--prompts",
                 str(three), "--out", str(tmp_path / "pngs"), "--device", "cpu", "--quiet"]) == 0
    from PIL import Image

    written = np.stack([np.asarray(Image.open(tmp_path / "pngs" / f"{i:06d}.png")) for i in range(3)])
    expected = np.concatenate([_uint8(router(PROMPTS[s:s + n], num_inference_steps=1,
                                             generator=torch.Generator().manual_seed(b), output_type="np").images)
                               for b, (s, n) in enumerate(((0, 2), (2, 1)))])
    assert np.array_equal(written, expected)
    source = open_source(str(out / "router"), steps=1, seed=0, device="cpu", prompts=PROMPTS[:3])
    assert source.shape == (3, 16, 16)
    assert np.array_equal(torch.cat(list(source.batches(3, 2))).permute(0, 2, 3, 1).numpy(), expected)
    assert main(["sample", str(out / "router"), "--num", "1", "--steps", "1", "--out", str(tmp_path / "y"),
                 "--quiet"]) == 2  # a text router needs prompts


def test_msd_text_refusals(sd, tiny_teacher, tmp_path):
    path, _ = sd
    base = ["--quiet", "--set", f"output_dir={tmp_path / 'msd'}"]
    assert main(["msd", "--partitions", "2", "--set", f"teacher.path={path}", *base]) == 2  # no data.prompts
    parts = tmp_path / "parts.json"
    parts.write_text(json.dumps([["a red shoe"], [3]]))
    assert main(["msd", "--partition-file", str(parts), "--set", f"teacher.path={path}", *base]) == 2
    assert main(["msd", "--partitions", "2", "--warmup-steps", "5", "--set", f"teacher.path={path}", *base]) == 2
    assert not (tmp_path / "msd" / "student-0").exists()


@pytest.mark.slow  # ~26 s on a loaded 2-core CPU: two warm-ups, two smaller students, the router, a rerun
def test_msd_warm_up_stage_end_to_end(tiny_cond_teacher, tmp_path):
    """`fastdiff msd --warmup-steps` with a smaller student.model: each student's warm-up is saved beside the runs
    (its error lowered), the student's run starts from it (student.model), the router takes the smaller students,
    and a rerun keeps both the warm-ups and the finished students."""
    from diffusers import UNet2DModel

    from fastdiff.training.msd_warmup import warm_up
    from fastdiff.config import Config, _apply, _yaml

    torch.manual_seed(6)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, num_class_embeds=4).save_pretrained(tmp_path / "small")
    out = tmp_path / "msd"
    args = ["msd", "--partitions", "2", "--warmup-steps", "4", "--warmup-lr", "3e-3", "--quiet"]
    for item in [f"teacher.path={tiny_cond_teacher}", f"output_dir={out}", f"student.model={tmp_path / 'small'}",
                 "train.max_steps=2", "train.batch_size=4", "objective.critic_updates=1", "train.lr_warmup_steps=0",
                 "train.checkpoint_every=100", "train.sample_every=100", "train.num_sample_images=2"]:
        args += ["--set", item]
    assert main(args) == 0
    for k, classes in enumerate(([0, 1], [2])):
        record = json.loads((out / f"student-{k}-warmup" / "warmup.json").read_text())
        assert record["settings"]["classes"] == classes and len(record["losses"]) == 4
        assert record["error_after"] < record["error_before"]
        cfg = Config()
        _apply(cfg, _yaml((out / f"student-{k}" / "config.yaml").read_text()))
        assert Path(cfg.student.model) == out / f"student-{k}-warmup"
    router = json.loads((out / "router" / "fastdiff.json").read_text())
    small = sum(p.numel() for p in UNet2DModel.from_pretrained(tmp_path / "small").parameters())
    assert [s["parameters"] for s in router["students"]] == [small, small]
    stamp = (out / "student-0-warmup" / "warmup.json").stat().st_mtime_ns
    assert main(args) == 0  # finished students kept; their warm-ups untouched
    assert (out / "student-0-warmup" / "warmup.json").stat().st_mtime_ns == stamp
    # A warm-up with the same settings is kept, not redone; another step count redoes it.
    cfg = Config()
    _apply(cfg, _yaml((out / "student-1" / "config.yaml").read_text()))
    _apply(cfg, {"student": {"model": str(tmp_path / "small")}})
    stamp = (out / "student-1-warmup" / "warmup.json").stat().st_mtime_ns
    warm_up(cfg, 4, 3e-3, out / "student-1-warmup", log=lambda *_: None)
    assert (out / "student-1-warmup" / "warmup.json").stat().st_mtime_ns == stamp
    warm_up(cfg, 5, 3e-3, out / "student-1-warmup", log=lambda *_: None)
    assert len(json.loads((out / "student-1-warmup" / "warmup.json").read_text())["losses"]) == 5
