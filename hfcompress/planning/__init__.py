"""Compress to a budget: per-layer sensitivity (:mod:`.sensitivity`, cuts in :mod:`.pruning`), the
planner that chooses each layer's format from it (:mod:`.planner`; with cuts, :mod:`.joint`), the
check that measures a plan (:mod:`.check`), and the ``hfcompress plan`` command (:mod:`.commands`)."""

from .planner import Plan, PlanError, bytes_for_bits, plan_for_bytes, plan_for_cost, uniform_plan
from .sensitivity import DEFAULT_OPTIONS, Sensitivity, SensitivityError, measure_sensitivity

__all__ = ["DEFAULT_OPTIONS", "Plan", "PlanError", "bytes_for_bits", "Sensitivity", "SensitivityError", "measure_sensitivity",
           "plan_for_bytes", "plan_for_cost", "uniform_plan"]
