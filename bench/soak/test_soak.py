#!/usr/bin/env python3
"""Checks the soak's accounting on hand-written wrk records: a harness that cannot
see a lost request would pass anything. Run by bench/soak.sh before every soak."""
import os
import tempfile
import unittest

import soak

RECORDS = """\
S 100.0 a
R 100.01 200 -
S 101.0 a
S 102.0 a
R 102.1 500 other
S 110.0 a
R 110.5 502 unavailable
S 111.0 a
R 111.5 502 timeout
S 112.0 n
R 112.1 502 unavailable
S 120.0 a
R 120.1 503 circuit
S 197.5 a
S 199.0 a
R 199.1 200 -
S 200.5 a
S 201.5 a
S 202.5 a
"""


class Accounting(unittest.TestCase):
    def account(self, records, windows):
        with tempfile.TemporaryDirectory() as out:
            with open(os.path.join(out, "wrk-0.log"), "w") as f:
                f.write(records)
            s = soak.Soak.__new__(soak.Soak)
            s.out, s.t0, s.t_term, s.t_closed, s.t_exit, s.probes = out, 100.0, 199.0, 201.0, 202.0, []
            s.windows = windows
            return s.account()

    def test_every_outcome_lands_in_its_bucket(self):
        a = self.account(RECORDS, [("api", 110.0, 111.0, "upstream-kill")])
        # 101.0: no answer; 102.0: 500; 112.0: /ns has no window; 120.0: 503 after the grace.
        self.assertEqual(a["lost_outside"], 4, a["samples"])
        # 111.0: a 502 whose body says "timeout" is the wrong answer even in a window.
        self.assertEqual(a["lost_in_fault"], 1, a["samples"])
        self.assertEqual(a["fault_answers"], 1)
        self.assertEqual(a["2xx"], 2)
        # 197.5 (in flight at SIGTERM) and 200.5 (before the listener closed).
        self.assertEqual(a["cut_at_shutdown"], 2)
        self.assertEqual(a["after_listener_closed"], 1)
        self.assertEqual(a["after_exit"], 1)
        self.assertEqual(a["sent"], 10)

    def test_the_grace_covers_a_breaker_still_open_after_the_fault(self):
        a = self.account("S 114.0 a\nR 114.1 503 circuit\n", [("api", 110.0, 111.0, "stall")])
        self.assertEqual((a["fault_answers"], a["lost_outside"]), (1, 0))

    def test_a_failed_probe_is_cut(self):
        with tempfile.TemporaryDirectory() as out:
            s = soak.Soak.__new__(soak.Soak)
            s.out, s.t0, s.t_term, s.t_closed, s.t_exit, s.windows = out, 0.0, 1.0, 2.0, 3.0, []
            s.probes = [{"status": 200}, {"status": 0, "error": "reset"}]
            self.assertEqual(s.account()["cut_at_shutdown"], 1)


if __name__ == "__main__":
    unittest.main()
