"""Pipeline classes for students no standard diffusers pipeline fits (installed as ``fastdiff.pipelines``)."""
from .pipeline_fastdiff_class_conditional import FastdiffClassConditionalPipeline
from .pipeline_fastdiff_flow_map import FastdiffFlowMapPipeline
from .pipeline_fastdiff_flow_map_sd import FastdiffFlowMapSDPipeline
from .pipeline_fastdiff_flow_map_sd3 import FastdiffFlowMapSD3Pipeline
from .pipeline_fastdiff_flow_map_sdxl import FastdiffFlowMapSDXLPipeline
from .pipeline_fastdiff_multi_guidance import FastdiffMultiGuidancePipeline
from .pipeline_fastdiff_multi_student import FastdiffMultiStudentPipeline, MultiStudentUNet
from .pipeline_fastdiff_nasa import FastdiffNASAPipeline

__all__ = ["FastdiffClassConditionalPipeline", "FastdiffFlowMapPipeline", "FastdiffFlowMapSDPipeline",
           "FastdiffFlowMapSD3Pipeline", "FastdiffFlowMapSDXLPipeline", "FastdiffMultiGuidancePipeline", "FastdiffMultiStudentPipeline", "MultiStudentUNet",
           "FastdiffNASAPipeline"]
