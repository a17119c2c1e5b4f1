#!/usr/bin/env bash
# Mutation testing of the modules that decide results (issue 16): mutmut 3 mutates one function
# at a time and runs the fast tests that cover it; a mutant the tests do not fail "survives".
# Not part of CI (minutes to hours); run it after changing one of these modules or its tests.
#
#   pip install -e '.[dev]'               # mutmut, once
#   benchmarks/mutation.sh                # every group below
#   benchmarks/mutation.sh heads ranking  # some groups
#   JOBS=1 benchmarks/mutation.sh steps   # fewer parallel children (default 2)
#
# A function mutmut reports "no tests" for (new since its last full statistics run), or survivors
# to judge again after writing tests: benchmarks/mutation_judge.py FUNCTION -- TESTS.
#
# setup.cfg [mutmut] names the mutated files and the tests that judge them. Results stay in
# mutants/ (ignored by git; a re-run only retests what changed): `mutmut results` lists the
# survivors, `mutmut show NAME` shows one. The score per group is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MUTMUT=${MUTMUT:-$(dirname "$PY")/mutmut}

declare -A MUTANTS_OF=(
  [heads]="virface.heads.*"
  [steps]="virface.steps.*"
  [generator]="virface.generator.*"
  [partial_fc]="virface.partial_fc.*"
  [metrics]="virface.metrics.*"
  [evaluation]="virface.evaluation.*"
  [sources]="virface.data.sources.*"
  # The synthetic faces' roles and held-out pairs, not the renderer's pixel arithmetic.
  [synthetic_roles]="virface.data.synthetic.x_identity_* virface.data.synthetic.x_draw_identity* virface.data.synthetic.x__build_pair_set* virface.data.synthetic.x_build_synthetic* virface.data.synthetic.x__render_identities*"
  # Which trial a stage chooses and carries on (the Pareto front's PNG plot left out: it decides
  # nothing), how a finished stage search concludes from Tune's results, and the chain of stages.
  [ranking]="virface.search.pareto.xǁ* virface.search.pareto.x__complete* virface.search.pareto.x_dominates* virface.search.pareto.x_pareto_front* virface.search.pareto.x_rank_trials* virface.search.pareto.x_carried_trials* virface.search.pareto.x_rank_by_rule* virface.search.pareto.x_select_point* virface.search.pareto.x_format_front* virface.search.pareto.x__number*"
  [conclusion]="virface.search.runner.x_conclude_stage* virface.search.runner.x_trial_row* virface.search.runner.x_best_epoch_of* virface.search.runner.x__trial_id* virface.search.runner.x_with_upstream_parameter*"
  [chaining]="virface.search.manifest.*"
  [runner]="virface.search.runner.*"
)
ORDER=(ranking conclusion metrics heads generator steps evaluation partial_fc sources synthetic_roles chaining runner)
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${ORDER[@]}")

globs=()
for group in "${selected[@]}"; do
  [ -n "${MUTANTS_OF[$group]:-}" ] || { echo "unknown group '$group'; groups: ${ORDER[*]}" >&2; exit 2; }
  read -r -a parts <<< "${MUTANTS_OF[$group]}"
  globs+=("${parts[@]}")
done

export OMP_NUM_THREADS=1
"$MUTMUT" run --max-children "${JOBS:-2}" "${globs[@]}" || true
"$PY" benchmarks/mutation_score.py "${selected[@]/#/--group=}" -- "${globs[@]}"
