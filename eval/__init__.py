"""Meta-evaluation of judges: `vlm-judge eval` (see eval/README.md).

metrics (pure agreement functions) -> benchmarks (file loaders) -> run (resumable judging) ->
agreement / compare (per judge, side by side, paired tests) -> probes (bias and grounding) ->
expected (score from probabilities) -> report + plots; pipeline ties them together, cli parses flags.
"""
