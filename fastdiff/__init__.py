"""fastdiff: distill a frozen diffusers teacher into a one- or few-step student."""
from .denoiser import Denoiser
from .errors import FastdiffError
from .generator import Generator
from .schedule import FlowSchedule, VPSchedule
from .teacher import Teacher, load_teacher

__version__ = "0.1.0"

__all__ = ["Denoiser", "FastdiffError", "Generator", "FlowSchedule", "VPSchedule", "Teacher", "load_teacher"]
