#!/usr/bin/env python3
"""The shipped observability files against real programs (stdlib only):

- promtool checks deploy/prometheus/alerts.yml and runs its unit tests
  (alerts.test.yml), and checks the Prometheus config;
- the demo stack (deploy/demo/demo.py, the compose configs) runs with a real
  Prometheus scraping both sidecars every second; its HTTP API must return
  `wsrelay_*` series from both, the targets up and the alert rules loaded;
- every query of deploy/grafana/wsrelay-dashboard.json runs against that
  Prometheus, and every metric it or an alert names is one the sidecars export.

    python3 deploy/observability/test.py      (WSRELAY_BIN: the binary, default target/debug/wsrelay)
"""

import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, os.environ.get("WSRELAY_BIN", "target/debug/wsrelay"))
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "wsrelay-dashboard.json")
DEMO = [sys.executable, os.path.join(ROOT, "deploy", "demo", "demo.py")]


def read(path):
    with open(path) as f:
        return f.read()


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def promql(state, query):
    url = f"http://127.0.0.1:{state['prometheus']}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        body = json.loads(get(url))
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
    return body


def metric_names(exprs):
    names = set()
    for e in exprs:
        e = re.sub(r'"[^"]*"', '""', e)  # not inside label values
        for m in re.findall(r"\b((?:wsrelay|process)_[a-z_]+)\b", e):
            names.add(re.sub(r"_(bucket|sum|count)$", "", m))
    return names


class Promtool(unittest.TestCase):
    def run_ok(self, *args):
        r = subprocess.run(["promtool", *args], cwd=PROM_DIR, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return r.stdout

    def test_rules_are_valid(self):
        self.assertIn("SUCCESS", self.run_ok("check", "rules", "alerts.yml"))

    def test_rules_fire_as_written(self):
        self.run_ok("test", "rules", "alerts.test.yml")

    def test_config_is_valid(self):
        self.run_ok("check", "config", "prometheus.yml")


class LiveStack(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="wsrelay-obs-")
        cls.addClassCleanup(lambda: subprocess.run([*DEMO, "--dir", cls.dir, "down"], capture_output=True))
        subprocess.run(
            [*DEMO, "--dir", cls.dir, "up", "--bin", BIN, "--http-port", "0", "--prom-port", "0", "--scrape-interval", "1s"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cls.state = json.loads(read(os.path.join(cls.dir, "state.json")))
        cls.traffic()
        # Two scrapes after the traffic.
        deadline = time.time() + 20
        while time.time() < deadline:
            r = promql(cls.state, 'count(wsrelay_hook_requests_total{hook="connect"})')
            if r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 2:
                break
            time.sleep(0.3)
        time.sleep(1.5)

    @classmethod
    def traffic(cls):
        """What a user does, so that hook and proxy series exist: page loads,
        WebSocket upgrades (connect hook), a notification (publish)."""
        port = cls.state["http"]
        get(f"http://127.0.0.1:{port}/health")
        for _ in range(4):  # nginx round-robin: both replicas
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/ws", headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": "wsrelay.v1",
                "Cookie": "session=alice-session"})
            assert c.getresponse().status == 101
            c.close()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/notify?user=alice", method="POST")
        urllib.request.urlopen(req, timeout=5).read()

    def exported(self):
        names = set()
        for n in ("1", "2"):
            text = get(f"http://127.0.0.1:{self.state['replicas'][n]['admin']}/metrics")
            names |= set(re.findall(r"^# TYPE (\S+) ", text, re.M))
        return names

    def test_prometheus_scrapes_both_sidecars(self):
        r = promql(self.state, "wsrelay_build_info")
        self.assertEqual(r["status"], "success", r)
        nodes = sorted(s["metric"]["node"] for s in r["data"]["result"])
        self.assertEqual(nodes, ["web-1", "web-2"])
        up = promql(self.state, 'up{job="wsrelay"}')["data"]["result"]
        self.assertEqual([s["value"][1] for s in up], ["1", "1"], up)
        series = json.loads(get(f"http://127.0.0.1:{self.state['prometheus']}/api/v1/label/__name__/values"))["data"]
        self.assertGreater(len([s for s in series if s.startswith("wsrelay_")]), 25, series)

    def test_alert_rules_are_loaded_and_healthy(self):
        groups = json.loads(get(f"http://127.0.0.1:{self.state['prometheus']}/api/v1/rules"))["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        self.assertEqual(len(rules), 11, [r["name"] for r in rules])
        for r in rules:
            self.assertEqual(r["health"], "ok", r)
        firing = json.loads(get(f"http://127.0.0.1:{self.state['prometheus']}/api/v1/alerts"))["data"]["alerts"]
        self.assertEqual(firing, [], "a healthy stack fires nothing")

    def test_alert_and_dashboard_metrics_exist(self):
        alerts = read(os.path.join(PROM_DIR, "alerts.yml"))
        exprs = re.findall(r"expr: (?:\|\n)?((?:.*\n)(?:\s{12,}.*\n)*)", alerts)
        dash = json.loads(read(DASHBOARD))
        exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        missing = metric_names(exprs) - self.exported()
        self.assertEqual(missing, set(), "named in alerts.yml or the dashboard, not exported by wsrelay")

    def test_every_dashboard_query_runs(self):
        dash = json.loads(read(DASHBOARD))
        self.assertEqual(dash["uid"], "wsrelay")
        empty = []
        for p in dash["panels"]:
            for t in p.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
                r = promql(self.state, expr)
                self.assertEqual(r.get("status"), "success", f"{p['title']}: {expr}: {r}")
                if not r["data"]["result"]:
                    empty.append(f"{p['title']}: {expr}")
        # Panels that must show something on a stack that served a little traffic.
        for title in ("Open WebSocket sessions", "Upgrade attempts by result", "Deliveries/s", "Broker up",
                      "Hook outcomes", "Hook latency (p99)", "Proxied requests by status", "Publish results"):
            self.assertFalse([e for e in empty if e.startswith(title + ":")], f"{title} shows no data")


def status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class ShippedNginx(unittest.TestCase):
    """deploy/nginx.conf (as the demo runs it) in front of two sidecars: one
    killed and restarted, then the other killed at once (a rolling restart
    done fast, or two crashes close together): every request is answered.
    With nginx's default passive check (max_fails=1 fail_timeout=10s) the
    first one would still be out for 10 s, and every request a 502 "no
    live upstreams"; the chaos soak found this with three sidecars."""

    def test_a_sidecar_back_from_a_kill_serves_at_once(self):
        d = tempfile.mkdtemp(prefix="wsrelay-nginx-")
        self.addCleanup(lambda: subprocess.run([*DEMO, "--dir", d, "down"], capture_output=True))
        up = [*DEMO, "--dir", d, "up", "--bin", BIN, "--http-port", "0", "--no-prometheus"]
        subprocess.run(up, check=True, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{json.loads(read(os.path.join(d, 'state.json')))['http']}/health"
        self.assertEqual(status(url), 200)
        subprocess.run([*DEMO, "--dir", d, "kill-sidecar", "1"], check=True)
        self.assertEqual([status(url) for _ in range(4)], [200] * 4, "the other sidecar answers")
        subprocess.run([*DEMO, "--dir", d, "start-sidecar", "1"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*DEMO, "--dir", d, "kill-sidecar", "2"], check=True)
        self.assertEqual([status(url) for _ in range(4)], [200] * 4, "the restarted sidecar answers at once")


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
