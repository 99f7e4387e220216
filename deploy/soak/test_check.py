"""The soak's checker on made-up histories: each kind of violation is
found, and what a client was told is not one (python3 -m unittest)."""

import unittest

from check import check


def msgs(client, ch, ns, p="api"):
    return [{"c": client, "ch": ch, "p": p, "n": n} for n in ns]


class Check(unittest.TestCase):
    def verdicts(self, events, acked, refused=None):
        return [v[3] for v in check(events, acked, refused or {})[0]]

    def test_every_acknowledged_message_once_in_order_is_clean(self):
        self.assertEqual(self.verdicts(msgs("w0", "a", [1, 2, 3]), {"a": [1, 2, 3]}), [])

    def test_a_silent_gap_a_duplicate_and_a_lost_tail_are_violations(self):
        events = msgs("w0", "a", [1, 3, 3])
        got = self.verdicts(events, {"a": [1, 2, 3, 4]})
        self.assertEqual(len(got), 3, got)
        self.assertIn("1 acknowledged lost silently before 3", got[0])
        self.assertIn("a duplicate or out of order", got[1])
        self.assertIn("the last 1 acknowledged never arrived", got[2])

    def test_a_gap_the_client_was_told_about_is_not(self):
        events = [*msgs("w0", "a", [1]), {"c": "w0", "ch": "a", "ev": "subscribed", "recovered": False}]
        events += msgs("w0", "a", [4])
        violations, totals = check(events, {"a": [1, 2, 3, 4]}, {})
        self.assertEqual(violations, [])
        self.assertEqual(totals["signalled"], 1)

    def test_publishers_are_followed_apart_and_client_publishes_count(self):
        events = [{"c": "w1", "ch": "chat", "ev": "acked", "p": "w1", "n": n} for n in (1, 2)]
        events += msgs("w0", "chat", [1], p="w1") + msgs("w0", "chat", [5], p="api") + msgs("w0", "chat", [2], p="w1")
        self.assertEqual(self.verdicts(events, {"chat": [5]}), [])
        self.assertIn("never published", self.verdicts(msgs("w0", "chat", [3], p="w1"), {})[0])

    def test_a_refused_publish_delivered_is_counted_not_a_violation(self):
        violations, totals = check(msgs("w0", "a", [1, 2]), {"a": [1]}, {"a": [2]})
        self.assertEqual((violations, totals["delivered though refused"]), ([], 1))

    def test_a_refused_publish_delivered_late_is_not_an_order_violation(self):
        # 3 refused (Redis applied it, the 200 was lost) and 4 acknowledged.
        violations, _ = check(msgs("w0", "a", [1, 2, 4, 3]), {"a": [1, 2, 4]}, {"a": [3]})
        self.assertEqual(violations, [])

    def test_a_subscription_that_never_delivered_is_a_violation(self):
        got = check(msgs("w0", "a", [1]), {"a": [1], "b": [1]}, {}, expected=[("w0", "a"), ("w0", "b")])[0]
        self.assertEqual([(v[0], v[2], v[3]) for v in got], [("b", "w0", "subscribed but never delivered a message")])


if __name__ == "__main__":
    unittest.main()
