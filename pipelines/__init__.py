"""Pipeline classes for students no standard diffusers pipeline fits (installed as ``fastdiff.pipelines``)."""
from .pipeline_fastdiff_class_conditional import FastdiffClassConditionalPipeline
from .pipeline_fastdiff_flow_map import FastdiffFlowMapPipeline

__all__ = ["FastdiffClassConditionalPipeline", "FastdiffFlowMapPipeline"]
