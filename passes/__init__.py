"""sparsecc.passes: the IR toolkit (matcher, rules, passes, pipelines, printer, verifier).

The IR is the FX graph of `torch.export.export(...).module()`; see DESIGN.md.
"""
from __future__ import annotations

from .cleanup import Cleanup
from .fold import FoldConstants
from .graph import module_path, module_subgraph, nodes_in_module, to_dot, to_networkx
from .manager import Pass, PassContext, PassManager, PassResult, PassStats, Skip
from .match import AnyArg, Const, Lit, Match, Op, Pattern, Var, match
from .options import format_option
from .pipeline import PipelineError, build_pipeline, format_pipeline, parse_pipeline
from .printer import print_graph
from .registry import PASSES
from .nm.prune import PruneNM
from .moe import ExpertParallel, MoEDispatch
from .attention import SparseAttention
from .tokens import TokenRouting
from .rewrite import CheckResult, Rule, RuleSet, apply_rules, fail, ok
from .rewriter import RewriteError, Rewriter
from .verify import VerificationError, verify_graph

__all__ = [
    "AnyArg", "CheckResult", "Cleanup", "Const", "ExpertParallel", "FoldConstants", "Lit", "Match", "Op", "PASSES", "Pass",
    "PassContext", "PassManager", "PassResult", "PassStats", "Pattern", "PipelineError", "PruneNM", "MoEDispatch", "SparseAttention", "TokenRouting",
    "RewriteError", "Rewriter", "Rule", "RuleSet", "Skip", "Var", "VerificationError",
    "apply_rules", "build_pipeline", "fail", "format_option", "format_pipeline", "match", "module_path",
    "module_subgraph", "nodes_in_module", "ok", "parse_pipeline", "print_graph", "to_dot",
    "to_networkx", "verify_graph",
]
