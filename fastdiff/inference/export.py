"""Export a student as a diffusers folder that ``from_pretrained`` loads: the teacher's own pipeline class (or
DDPMPipeline / fastdiff's class-conditional and flow-map pipelines) with the student network, a scheduler set to
fastdiff's levels (``schedulers``), fastdiff.json and a model card (``model_card``); LoRA students as weights for
``load_lora_weights``, fused, or both. Written atomically (a temporary folder renamed into place), with no local
paths left in it; ``check_exportable`` refuses what cannot be exported before training starts."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from diffusers import DDPMPipeline
from huggingface_hub import ModelCard

from ..errors import FastdiffError
from .export_format import CLASS_COND_FILE, FLOW_MAP_PIPELINES, PIPELINES_DIR, SAMPLE_GRID, TORCH_DTYPES, is_hub_id
from .model_card import model_card
from .schedulers import flux_scheduler, save_extra_schedulers, scheduler_for


def _class_cond_pipeline_file() -> Path:
    try:  # installed: fastdiff.pipelines maps to the repository's pipelines/ folder
        import fastdiff.pipelines as pkg

        return Path(pkg.__file__).parent / CLASS_COND_FILE
    except ImportError:
        return PIPELINES_DIR / CLASS_COND_FILE


def check_exportable(model, teacher) -> None:
    """Raise if ``export_student`` cannot write this student (the trainer asks before training, not after).

    Teachers with a pipeline (latent, text-to-image) export into their own pipeline class; the rest into
    DDPMPipeline or fastdiff's class-conditional pipeline, which take a UNet2DModel (or the guidance-embedded one)
    on a VP schedule; flow-map students of pipeline teachers into fastdiff's flow-map pipeline for that class."""
    if teacher.pipeline is not None:
        from ..models.flow_map import flow_map_embedding

        if flow_map_embedding(model) is not None:
            check_flow_map_exportable(model, type(teacher.pipeline).__name__)
        return
    name, kind = type(model).__name__, teacher.denoiser.schedule.kind
    if kind != "vp" or name not in ("UNet2DModel", "GuidanceEmbeddedUNet", "FlowMapModel"):
        raise FastdiffError(f"export of {name} students on a {kind} schedule is not supported yet; export supports "
                            "UNet2DModel students on a VP schedule and students of teachers with a diffusers pipeline")


def weight_options(dtype: str | None, variant: str | None) -> dict:
    """``export_student``'s dtype / variant from ``fastdiff export --dtype / --variant``: a variant's files hold weights
    of its own dtype (diffusers' convention: ``variant="fp16"`` files are float16), so the dtype follows the variant."""
    if dtype not in (None, "fp32", *TORCH_DTYPES):
        raise FastdiffError(f"--dtype must be fp32, fp16 or bf16, got {dtype!r}")
    if variant not in (None, *TORCH_DTYPES):
        raise FastdiffError(f"--variant must be fp16 or bf16, got {variant!r}")
    if variant and dtype not in (None, variant):
        raise FastdiffError(f"--variant {variant} files hold {variant} weights: leave --dtype out or pass --dtype {variant}")
    dtype = variant or (None if dtype == "fp32" else dtype)
    return {"dtype": dtype, "variant": variant}


def export_student(unet, teacher, info: dict, out: str | Path, sample_grid: str | Path | None = None,
                   dtype: str | None = None, variant: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``out`` atomically: a diffusers pipeline folder + fastdiff.json + README.md model card.

    ``info`` holds: teacher, teacher_folder (the folder loaded), objective, num_steps, sigma_init, train_step, ema,
    settings (a dict). ``sample_grid``: a PNG shown by the card; ``dtype`` (fp16 / bf16) casts every saved weight;
    ``variant`` names the weight files as diffusers' variants; ``repo_id``: the hub repo the card's call loads from
    (default: the folder itself). No file of the export holds an absolute local path (see ``_portable``).
    """
    out = Path(out)
    weight_options(dtype, variant)
    from ..models.layer_skip import exportable

    unet = exportable(unet)  # a budget-conditioned student: the plain, smaller transformer at its export budget
    info = {**info, "dtype": dtype, "variant": variant}
    card = {"grid": Path(sample_grid) if sample_grid else None, "where": repo_id or ".", "teacher": teacher}
    if teacher.pipeline is not None:
        from ..models.flow_map import flow_map_embedding

        if flow_map_embedding(unet) is not None:  # the teacher's pipeline would drop the r embedding: fastdiff's
            return export_flow_map_pipeline_student(unet, teacher, info, out, card)  # flow-map pipeline for it
        return export_pipeline_student(unet, teacher, info, out, card)
    from ..models.lora import is_lora, merged_model

    if is_lora(unet):  # pipelines without a latent / text part take LoRA students fused (fastdiff.json says so)
        unet, info = merged_model(unet), {**info, "lora_export": "fused"}
    from ..models.flow_map import flow_map_embedding
    from ..models.flow_map_model import FlowMapModel

    flow_map = flow_map_embedding(unet) is not None
    if flow_map:  # a two-time (meanflow) student: its own network class and pipeline, DDIM steps told r
        unet = unet if isinstance(unet, FlowMapModel) else FlowMapModel.wrap(unet)
        info = {**info, "flow_map": True, "sampler": "ddim"}
    check_exportable(unet, teacher)
    guided = type(unet).__name__ == "GuidanceEmbeddedUNet"
    info = _student_info(info, teacher, guided)
    scheduler = scheduler_for(teacher, info)
    if flow_map:
        from fastdiff.pipelines.pipeline_fastdiff_flow_map import FastdiffFlowMapPipeline

        pipe = FastdiffFlowMapPipeline(unet=unet, scheduler=scheduler)
    elif teacher.num_classes:
        from fastdiff.pipelines import FastdiffClassConditionalPipeline

        pipe = FastdiffClassConditionalPipeline(unet=unet, scheduler=scheduler)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)

    def fill(tmp: Path) -> None:
        _save_pipeline(pipe, tmp, dtype, variant)
        # lets DiffusionPipeline.from_pretrained(out, custom_pipeline=out) work without fastdiff
        if teacher.num_classes and not flow_map:
            shutil.copy(_class_cond_pipeline_file(), tmp / "pipeline.py")
        _write_card(tmp, info, out, card)
    return _write_folder(out, fill, teacher)


def _save_pipeline(pipe, folder: Path, dtype: str | None, variant: str | None) -> None:
    if dtype:
        import torch

        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):  # diffusers' to() warns on every model; plain to() where nothing
                keep = getattr(part, "_keep_in_fp32_modules", None)  # has to stay float32
                dtype_ = getattr(torch, TORCH_DTYPES[dtype])
                part.to(dtype_) if keep else torch.nn.Module.to(part, dtype_)
    pipe.save_pretrained(folder, safe_serialization=True, variant=variant)


def _student_info(info: dict, teacher, guided: bool) -> dict:
    """What fastdiff.json records about every exported student (and the model card reads)."""
    from ..models.generator import top_timestep

    vp = teacher.denoiser.schedule.kind == "vp"
    info = {**info, "num_classes": teacher.num_classes, "null_class": teacher.null_class, "guidance_embedded": guided,
            "prediction_type": teacher.denoiser.prediction_type, "format": "fastdiff-student-v1",
            "top_timestep": top_timestep(teacher.denoiser, info.get("sigma_init")) if vp else None}
    if info.get("flow_map") and vp:  # the card's two-step advice: flow-time levels (flow teachers' tables are those)
        from ..models.flow_map import FlowMapGenerator

        info["flow_levels_2"] = FlowMapGenerator(teacher.denoiser, 1, info.get("sigma_init"), levels="flow").timesteps(2)
    return info


def _tmp_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def _write_card(folder: Path, info: dict, out: Path, card: dict) -> None:
    """fastdiff.json and README.md of ``folder`` (being written in ``out``'s temporary folder), with the sample grid
    copied beside them; paths recorded relative to where the folder will be (see ``_portable``)."""
    final = out / folder.relative_to(_tmp_folder(out))
    info = _portable(info, final, card["teacher"])
    if card["grid"] is not None and card["grid"].is_file():
        shutil.copy(card["grid"], folder / SAMPLE_GRID)
        info["sample_grid"] = SAMPLE_GRID
    (folder / "fastdiff.json").write_text(json.dumps(info, indent=2, default=str))
    model_card(info, card["where"] if final == out else ".").save(str(folder / "README.md"))


def teacher_hub_id(path: str, given: str) -> str | None:
    """The teacher's hub id when known: the teacher given as one, or ``_name_or_path`` of the teacher folder's
    model_index.json / model config (diffusers writes the hub id there when a hub pipeline is saved)."""
    if is_hub_id(given):
        return given
    root = Path(path)
    for config in (root / "model_index.json", root / "unet" / "config.json", root / "transformer" / "config.json"):
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError):
            continue
        if is_hub_id(name):
            return name
    return None


def teacher_license(path: str, hub_id: str | None) -> dict:
    """license (and license_name / license_link for ``other``) of the teacher's own model card: its README.md in the
    teacher folder, else the hub repo's (from the local cache when offline); {} when it has none."""
    readme = Path(path) / "README.md"
    try:
        if not readme.is_file() and hub_id:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(hub_id, "README.md"))
        data = ModelCard.load(str(readme), ignore_metadata_errors=True).data if readme.is_file() else None
    except Exception:  # noqa: BLE001 - no card (or no network): the export simply names no license
        return {}
    if data is None:
        return {}
    return {k: getattr(data, k, None) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


def _portable(info: dict, where: Path, teacher) -> dict:
    """``info`` without local absolute paths: ``teacher_folder`` relative to the exported folder ``where`` (or the
    hub id / ``embedded:`` name it was given as), ``teacher`` by hub id when known; plus the card's metadata."""
    from ..models.embedded import PREFIX

    given, loaded = str(info["teacher"]), str(info.get("teacher_folder") or teacher.path)
    hub_id = teacher_hub_id(loaded, given)
    if given.startswith(PREFIX) or is_hub_id(given):
        folder = given
    else:
        folder = os.path.relpath(Path(loaded).resolve(), Path(where).resolve())
    return {**info, "teacher": hub_id or (given if given.startswith(PREFIX) else folder), "teacher_folder": folder,
            "base_model": hub_id, "license": teacher_license(loaded, hub_id),
            "pipeline_tag": "text-to-image" if teacher.conditioning == "text" else "unconditional-image-generation"}


def _drop_local_names(folder: Path) -> None:
    """diffusers and transformers record where a model was loaded from (``_name_or_path``) in every config they
    save; a local absolute path there is dropped (hub ids stay)."""
    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()
                    if not (k in ("_name_or_path", "name_or_path") and isinstance(v, str) and os.path.isabs(v))}
        return [clean(v) for v in node] if isinstance(node, list) else node

    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        cleaned = clean(data)
        if cleaned != data:
            path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


TEXT_SUFFIXES = (".json", ".md", ".txt", ".py", ".yaml", ".yml")


def _check_no_local_paths(folder: Path, *roots: Path) -> None:
    """Refuse an export whose text files name a local folder (the export's own, the teacher's): a bug guard."""
    needles = {str(Path(r).resolve()) for r in roots} | {str(r) for r in roots if os.path.isabs(str(r))}
    for path in folder.rglob("*"):
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            text = path.read_text(errors="replace")
            # an absolute path starts the string (or follows a quote, a space...); a relative path to the teacher
            # (../../work/teachers/x) holds the same characters after a dot
            hit = next((n for n in needles if re.search(r"(?<![\w.])" + re.escape(n), text)), None)
            if hit:
                raise FastdiffError(f"export: {path.relative_to(folder)} names the local path {hit}")


def _write_folder(out: Path, fill, teacher) -> Path:
    """An export folder written atomically (``write_atomically``), checked for local paths before it replaces ``out``."""
    def checked_fill(tmp: Path) -> None:
        fill(tmp)
        _drop_local_names(tmp)
        _check_no_local_paths(tmp, tmp, out, Path(teacher.path))
    return write_atomically(out, checked_fill)


def write_atomically(out: Path, fill) -> Path:
    """``fill(tmp)`` writes into a hidden temporary folder beside ``out``, renamed to ``out`` at the end: an
    interrupted write leaves no half folder, and an existing ``out`` stays until the new one is whole."""
    tmp = _tmp_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_pipeline_student(model, teacher, info: dict, out: Path, card: dict) -> Path:
    """A latent / text-to-image student as the teacher's own pipeline class with the student network and a
    scheduler reproducing fastdiff's sampler; a LoRA student as LoRA weights for the teacher pipeline
    (``student.lora_export`` lora), a fused full pipeline (fused), or both (the fused one in ``fused/``)."""
    from diffusers import DiffusionPipeline

    from ..models.lora import is_lora, lora_state_dict, merged_model
    from ..models.teacher import load_pipeline, pipeline_index

    guided = bool(getattr(model.config, "time_cond_proj_dim", None))  # LCM-style: the scale is an input
    info = _student_info(info, teacher, guided)
    scheduler = scheduler_for(teacher, info)
    index = pipeline_index(teacher.path)
    cls = type(teacher.pipeline)
    expected, _ = DiffusionPipeline._get_signature_keys(cls)
    absent = [k for k in expected if index.get(k) in (None, [None, None]) and k not in cls._optional_components]
    info.update(pipeline_class=index["_class_name"], scheduler_class=type(scheduler).__name__,
                absent_components=absent)  # e.g. SD3 without T5: from_pretrained needs them passed as None
    if "PixArt" in info["pipeline_class"] and model.config.sample_size not in (32, 64, 128):
        info["call_args"] = ", use_resolution_binning=False"  # PixArt bins only its 256/512/1024 px sizes
    if info["pipeline_class"] == "SanaPipeline":  # its default is 1024 px whatever the model: name the student's size
        from ..models.sana import call_args

        info["call_args"] = call_args(model, teacher.pipeline.vae_scale_factor)
    if info["pipeline_class"] == "FluxPipeline":  # the guidance embedding's value; the size when not the default
        from ..models import flux

        info["embedded_guidance"] = flux.embedded_guidance(model)
        _, h, w = teacher.image_shape
        if (h, w) != (flux.default_image_size(teacher.pipeline),) * 2:
            info["call_args"] = f", height={h}, width={w}"
    lora = is_lora(model)
    # A guidance-embedded student's scale embedding (agd's cond_proj) is not a LoRA weight: a LoRA file loaded into
    # the teacher's pipeline would sample without it, so such students export fused only.
    mode = info.get("lora_export", "both") if lora and not guided else "fused"
    if lora:
        info["lora_export"] = mode  # the card says what was written
    dtype, variant = info.get("dtype"), info.get("variant")

    def write_pipeline(folder: Path, network) -> None:
        pipe = load_pipeline(teacher.path, index, safety_checker=True,
                             **{teacher.model_folder: network, "scheduler": scheduler})
        _save_pipeline(pipe, folder, dtype, variant)
        save_extra_schedulers(scheduler, folder, info)
        _write_card(folder, {**info, "export": "pipeline"}, out, card)

    def write_lora(folder: Path) -> None:  # the trainer has checked that the pipeline class loads LoRA weights
        weights = lora_state_dict(model)
        if dtype:  # LoRA files have no variants: the dtype is the one of the weights in the file
            import torch

            weights = {k: v.to(getattr(torch, TORCH_DTYPES[dtype])) for k, v in weights.items()}
        cls.save_lora_weights(folder, **{f"{teacher.model_folder}_lora_layers": weights}, safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
        save_extra_schedulers(scheduler, folder, info)
        _write_card(folder, {**info, "export": "lora", "format": "fastdiff-lora-v1", "variant": None}, out, card)
        if mode == "both":
            write_pipeline(folder / "fused", merged_model(model))

    if mode in ("lora", "both"):
        return _write_folder(out, write_lora, teacher)
    return _write_folder(out, lambda tmp: write_pipeline(tmp, merged_model(model) if lora else model), teacher)


def check_flow_map_exportable(model, pipeline_class: str) -> None:
    if pipeline_class not in FLOW_MAP_PIPELINES:
        raise FastdiffError(f"export of flow-map (meanflow, ayf) students of {pipeline_class} teachers is not "
                            f"supported yet; supported: {', '.join(FLOW_MAP_PIPELINES)} and pixel VP teachers")
    if getattr(model.config, "time_cond_proj_dim", None):
        raise FastdiffError("export of flow-map students with a guidance embedding is not supported")


def export_flow_map_pipeline_student(model, teacher, info: dict, out: Path, card: dict) -> Path:
    """A latent text-to-image flow-map (meanflow) student: the teacher's components with the network as
    ``FlowMapModel`` in fastdiff's flow-map pipeline for that teacher class (any K; each step told the level it maps
    to); the pipeline's file is copied in (``custom_pipeline`` = its name). Scheduler: VP teachers the
    trailing DDIMScheduler (``deterministic_scheduler``), flow teachers FlowMatchEuler with shift 1, the pipeline
    passing the levels ``1 - i/K`` (``flux_scheduler``'s configuration)."""
    import importlib

    from ..models.flow_map_model import FlowMapModel
    from ..models.lora import is_lora, merged_model
    from ..models.teacher import load_pipeline, pipeline_index

    if is_lora(model):  # the r embedding is no LoRA weight: the adapters fused, the embedding kept
        model, info = merged_model(model), {**info, "lora_export": "fused"}
    index = pipeline_index(teacher.path)
    parent = index["_class_name"]
    # a flow-map export itself (``fastdiff tune`` re-exports one): ``load_flow_map_student`` loaded every component
    # of its folder into the parent class, which then gives the components instead of the folder's custom class
    again = any(name == parent for _, name in FLOW_MAP_PIPELINES.values())
    if again:
        parent = type(teacher.pipeline).__name__
    check_flow_map_exportable(model, parent)
    file, name = FLOW_MAP_PIPELINES[parent]
    info = _student_info({**info, "flow_map": True, "sampler": "ddim"}, teacher, False)
    flow = teacher.denoiser.schedule.kind == "flow"
    scheduler = flux_scheduler(teacher.scheduler, info["num_steps"], "ddim") if flow else scheduler_for(teacher, info)
    cls = getattr(importlib.import_module(f"fastdiff.pipelines.{file[:-3]}"), name)  # a subclass of the teacher's
    expected, _ = cls._get_signature_keys(cls)
    absent = [k for k in expected if index.get(k) in (None, [None, None]) and k not in cls._optional_components]
    info.update(pipeline_class=name, scheduler_class=type(scheduler).__name__, absent_components=absent)
    base = teacher.pipeline if again else load_pipeline(teacher.path, index, safety_checker=True,
                                                        **{teacher.model_folder: teacher.model, "scheduler": scheduler})
    network = model if isinstance(model, FlowMapModel) else FlowMapModel.wrap(model)
    # the teacher's components and settings (requires_safety_checker), its network replaced by the flow-map one
    pipe = cls(**{**base.components, "scheduler": scheduler, teacher.model_folder: network},
               **{k: v for k, v in base.config.items() if k in cls._get_signature_keys(cls)[1]
                  and k not in base.components})

    def fill(tmp: Path) -> None:
        _save_pipeline(pipe, tmp, info.get("dtype"), info.get("variant"))
        # under its own name, not pipeline.py: diffusers imports every local custom pipeline.py as one module, so a
        # second folder's class would join the first's there (ambiguous in one process)
        shutil.copy(Path(importlib.import_module("fastdiff.pipelines").__file__).parent / file, tmp / file)
        _write_card(tmp, {**info, "export": "pipeline"}, out, card)
    return _write_folder(out, fill, teacher)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Hub model repo ``repo_id`` (created when missing) with
    ``huggingface_hub.HfApi().upload_folder``; returns the commit's URL. Failures are one line."""
    import huggingface_hub

    if not is_hub_id(repo_id):
        raise FastdiffError(f"--push-to-hub {repo_id!r}: expected a hub repo id, owner/name")
    folder = Path(folder)
    if not (folder / "fastdiff.json").is_file():
        raise FastdiffError(f"{folder} is not a fastdiff export (no fastdiff.json)")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message="fastdiff export")
    except Exception as exc:  # noqa: BLE001 - network, auth and hub errors become one line
        text = str(exc).strip().splitlines()
        raise FastdiffError(f"push to {repo_id} failed: {text[0] if text else type(exc).__name__}") from exc
    return str(getattr(commit, "commit_url", None) or commit)


