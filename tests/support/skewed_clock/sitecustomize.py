"""A host whose wall clock is off, for one process: Python imports this module at start-up
(``site``) when its folder is on ``PYTHONPATH``, and then ``time.time`` (and ``time_ns``)
run ``CLOCK_SKEW`` seconds ahead (negative: behind); the monotonic clock is untouched.

Used through ``tests.support.workers.skewed_clock``. libfaketime would do it from outside,
but under it Python 3.11's ``time.sleep`` fails with EINVAL (its absolute monotonic sleep).
"""

import os
import time

_skew = float(os.environ.get("CLOCK_SKEW") or 0)
if _skew:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
