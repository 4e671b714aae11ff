"""Pipeline classes for students no standard diffusers pipeline fits (installed as ``fastdiff.pipelines``)."""
from .pipeline_fastdiff_class_conditional import FastdiffClassConditionalPipeline

__all__ = ["FastdiffClassConditionalPipeline"]
