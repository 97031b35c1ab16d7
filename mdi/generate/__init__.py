"""The stage step (prefill/decode), sampling, the context-overflow schedule, and
single-device generation."""
from .local import LocalGenerator, generate
from .sampling import SamplingConfig, sample_generator, sample_token
from .schedule import SampleState, make_groups, plan_step

__all__ = ["LocalGenerator", "SampleState", "SamplingConfig", "generate", "make_groups",
           "plan_step", "sample_generator", "sample_token"]
