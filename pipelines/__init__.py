"""Pipeline classes for students no standard diffusers pipeline fits (installed as ``fastdiff.pipelines``)."""
from .pipeline_fastdiff_class_conditional import FastdiffClassConditionalPipeline
from .pipeline_fastdiff_flow_map import FastdiffFlowMapPipeline
from .pipeline_fastdiff_multi_student import FastdiffMultiStudentPipeline, MultiStudentUNet
from .pipeline_fastdiff_nasa import FastdiffNASAPipeline

__all__ = ["FastdiffClassConditionalPipeline", "FastdiffFlowMapPipeline", "FastdiffMultiStudentPipeline", "MultiStudentUNet",
           "FastdiffNASAPipeline"]
