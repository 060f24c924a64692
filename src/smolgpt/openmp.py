"""How OpenMP's compute threads wait, set before torch loads OpenMP (which reads it once).

``import smolgpt`` imports this module first of all, so the setting is in place whenever
smolgpt is imported before torch.
"""

import os
import sys

# Compute threads that spin only briefly when they wait between parallel operations. OpenMP
# (libgomp) keeps a finished thread spinning 300,000 times in case more work comes: on a
# CPU that other programs share, the spinning thread takes the core its partner needs, and
# training can collapse (1 step where a quiet run made ~200, beside two busy loops on 2
# cores). 10,000 spins keep a quiet CPU's speed; no spinning at all (OMP_WAIT_POLICY=
# PASSIVE) cost a third of it with small models (nano char, 10 s runs with
# GOMP_SPINCOUNT=0 against 10000 and the default: 73-77k against 110k training tokens/s on
# a 2-core AMD EPYC with AVX-512 BF16; benchmarks/busy_cpu.py compares the busy case with
# OpenMP's defaults). OpenMP reads the
# setting once, when torch loads it: hence here, before anything of smolgpt imports torch.
# A setting of the user's own wins.
SPIN_COUNT = "10000"
WAIT_POLICY_IN_TIME = "torch" not in sys.modules
if not any(name in os.environ for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
