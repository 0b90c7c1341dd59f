"""The jobs fault script (`bench/jobs_faults.py`) in its smoke mode: a handful of jobs, two
workers, one SIGKILLed mid-job, Redis restarted, every job terminal, none lost or doubled.

Marked slow (a few minutes of real processes on 2 cores), so it is not in the default run;
it exists so the script itself cannot rot unnoticed: `pytest -m slow tests/integration/test_jobs_faults_quick.py`.
"""

from __future__ import annotations

import shutil

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)")
def test_jobs_fault_script_quick_mode_passes():
    from bench.jobs_faults import main

    assert main(["--quick", "--no-write"]) == 0
