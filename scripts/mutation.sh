#!/usr/bin/env bash
# Mutation testing of the modules that compute reported numbers (not part of CI: too slow).
# mutmut 3 changes one operator, constant or call at a time and runs the module's fast tests;
# a change that no test notices ("survived") is a hole in the tests or an equivalent mutant.
# docs/testing.md holds the scores and the judged survivors.
#
#   bash scripts/mutation.sh                  # every target below
#   bash scripts/mutation.sh worst_case objectives
#
# Needs the [mutation] extra (pip install -c constraints.txt -e ".[mutation]"). mutmut names a
# mutant after the file's path, but `adapters/` is installed as `atpt_plugin.adapters`, so each
# target runs in a staging copy (build/mutation/<target>/) laid out as the installed package:
# atpt_plugin/ with adapters/ inside it. Results per target: build/mutation/<target>/report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MUTMUT="$ROOT/.venv/bin/mutmut"
CHILDREN="${MUTATION_CHILDREN:-2}"

declare -A SOURCE=(
    [worst_case]=atpt_plugin/adapters/worst_case.py
    [rows]=atpt_plugin/adapters/rows.py
    [resultlog]=atpt_plugin/adapters/resultlog.py
    [builtin]=atpt_plugin/aggregators/builtin.py
    [crops]=atpt_plugin/augmenters/crops.py
    [objectives]=atpt_plugin/objectives.py
    [tuning]=atpt_plugin/tuning.py
)
declare -A TESTS=(
    [worst_case]="tests/test_worst_case.py"
    [rows]="tests/test_eval_cli.py tests/test_orchestrator.py tests/test_eval_faults.py"
    [resultlog]="tests/test_eval_faults.py tests/test_orchestrator.py"
    [builtin]="tests/test_aggregators.py tests/test_baselines.py"
    [crops]="tests/test_augmenters.py"
    [objectives]="tests/test_aggregators.py tests/test_tuning.py tests/test_adapter.py"
    [tuning]="tests/test_tuning.py tests/test_adapter.py"
)
ORDER=(worst_case builtin objectives crops tuning rows resultlog)

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ORDER[@]}")
for target in "${targets[@]}"; do
    if [ -z "${SOURCE[$target]:-}" ]; then
        echo "unknown target '$target'; choose from: ${ORDER[*]}" >&2
        exit 2
    fi
done

for target in "${targets[@]}"; do
    stage="$ROOT/build/mutation/$target"
    rm -rf "$stage"
    mkdir -p "$stage"
    cp -r atpt_plugin tests pyproject.toml "$stage/"
    cp -r adapters "$stage/atpt_plugin/adapters"
    find "$stage" -name __pycache__ -prune -exec rm -rf {} +
    {
        echo "[mutmut]"
        echo "source_paths = atpt_plugin"
        echo "only_mutate = ${SOURCE[$target]}"
        printf 'pytest_add_cli_args =\n    -m\n    not slow\n    -p\n    no:cacheprovider\n'
        echo "pytest_add_cli_args_test_selection ="
        for test in ${TESTS[$target]}; do echo "    $test"; done
    } >"$stage/setup.cfg"
    echo "== $target: ${SOURCE[$target]} against ${TESTS[$target]}"
    (
        cd "$stage"
        OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$MUTMUT" run --max-children "$CHILDREN" >run.log 2>&1 || true
        "$MUTMUT" export-cicd-stats >/dev/null
        {
            echo "target: $target (${SOURCE[$target]}); tests: ${TESTS[$target]} (-m 'not slow')"
            cat mutants/mutmut-cicd-stats.json
            echo
            "$MUTMUT" results --all true
        } >report.txt 2>&1
        cat report.txt | head -20
    )
done
