"""The soak's checker, independent of the sidecars' own counters: it reads
only what the clients saw (clients.mjs's events) and what publishers were
told. A message is (channel, publisher, n); each publisher publishes one at
a time, so its acknowledged messages are in offset order."""

import bisect
import collections

COUNTED = {
    "event acked": "Socket.IO events acked by the app",
    "event unanswered": "Socket.IO events unanswered",
    "paused": "slow consumers paused",
}


def check(events, api_acked, api_refused, expected=()):
    """(violations, totals): a violation is (channel, n, client, what).
    `expected`: the (client, channel) pairs that must have seen at least one
    message (a subscription that never delivered anything is not a pass)."""
    acked = {(ch, "api"): sorted(ns) for ch, ns in api_acked.items()}
    refused = {(ch, "api"): set(ns) for ch, ns in api_refused.items()}
    totals = collections.Counter()
    client_acked = collections.defaultdict(list)
    per = collections.defaultdict(list)
    for e in events:
        ev = e.get("ev")
        if ev == "acked":
            client_acked[(e["ch"], e["p"])].append(e["n"])
            totals["client publishes acknowledged"] += 1
        elif ev == "refused":
            refused.setdefault((e["ch"], e["p"]), set()).add(e["n"])
            totals["client publishes failed"] += 1
        elif ev in COUNTED:
            totals[COUNTED[ev]] += 1
        elif e.get("ch"):
            per[(e["c"], e["ch"])].append(e)
    violations = []
    for client, ch in expected:
        if not any("n" in e for e in per.get((client, ch), ())):
            violations.append((ch, None, client, "subscribed but never delivered a message"))
    for key, ns in client_acked.items():
        acked[key] = sorted(ns)
    acked_set = {k: set(v) for k, v in acked.items()}
    for (client, ch), evs in sorted(per.items()):
        last, told = {}, set()  # per publisher: the last n seen; told since then
        for e in evs:
            if e.get("ev") == "gap" or (e.get("ev") == "subscribed" and e.get("recovered") is False):
                totals["signalled"] += 1
                told.update(last)
                continue
            if e.get("ev") == "failed":  # told too, but the app allows every subscription
                totals["subscriptions failed"] += 1
                told.update(last)
                continue
            if e.get("ev") == "subscribed":
                totals["recovered" if e.get("recovered") else "subscribed"] += 1
                continue
            p, n = e.get("p", "api"), e["n"]
            key = (ch, p)
            totals["delivered"] += 1
            if n not in acked_set.get(key, ()):
                if n in refused.get(key, ()):
                    # README (Admin API): a publish that Redis applied before
                    # failing may still go out although its publisher got an
                    # error. Not acknowledged, so not part of the order check.
                    totals["delivered though refused"] += 1
                else:
                    violations.append((ch, n, client, f"from {p}: delivered but never published"))
                continue
            sent = acked.get(key, [])
            if p in last:
                if n <= last[p]:
                    violations.append((ch, n, client, f"from {p} after {last[p]}: a duplicate or out of order"))
                    continue
                i, j = bisect.bisect_right(sent, last[p]), bisect.bisect_left(sent, n)
                if j > i and p not in told:
                    violations.append((ch, sent[i], client, f"from {p}: {j - i} acknowledged lost silently before {n}"))
            last[p] = n
            told.discard(p)
        for p, n in last.items():
            sent = acked.get((ch, p), [])
            i = bisect.bisect_right(sent, n)
            if i < len(sent) and p not in told:
                violations.append(
                    (ch, sent[i], client, f"from {p}: the last {len(sent) - i} acknowledged never arrived")
                )
    return violations, totals
