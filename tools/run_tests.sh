#!/usr/bin/env bash
# The test suite: sets up the virtual environment if needed, then runs pytest.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k parallel -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -ra --durations=25 tests "$@"
