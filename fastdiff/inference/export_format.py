"""What an exported student folder is made of: names shared by the export, its model card and the code that reads
it back (``export``, ``model_card``, ``students``)."""
from __future__ import annotations

import re
from pathlib import Path

PIPELINES_DIR = Path(__file__).resolve().parents[2] / "pipelines"  # the repository's pipelines/ (a source tree)
CLASS_COND_FILE = "pipeline_fastdiff_class_conditional.py"
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # --dtype / --variant names -> torch attribute names
SAMPLE_GRID = "samples.png"  # the run's last sample grid, shown by the model card
# teacher pipeline class -> fastdiff's flow-map pipeline for its students (file in pipelines/, class)
FLOW_MAP_PIPELINES = {"StableDiffusionPipeline": ("pipeline_fastdiff_flow_map_sd.py", "FastdiffFlowMapSDPipeline"),
                      "StableDiffusionXLPipeline": ("pipeline_fastdiff_flow_map_sdxl.py", "FastdiffFlowMapSDXLPipeline"),
                      "StableDiffusion3Pipeline": ("pipeline_fastdiff_flow_map_sd3.py", "FastdiffFlowMapSD3Pipeline")}


def is_hub_id(name) -> bool:
    """``owner/name`` that is not a local path: what ``from_pretrained`` fetches from the Hub."""
    return (isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
            and not name.startswith((".", "/", "~")) and not Path(name).exists())
