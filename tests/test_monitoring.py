"""Monitoring (deploy/): the alerting rules and the dashboard, held to promtool, to a real
worker's metrics endpoint, and to a real Prometheus scraping that worker through an outage;
and the oldest-live age those rules read, against a real Redis.

``promtool`` and ``prometheus`` are Debian's (``make prometheus``, which ``make test`` runs).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, use_settings, wait_for
from tests.support.redis_server import free_port
from tests.support.scripts import claim, run
from tests.support.workers import service_env, start_worker

RULES = ROOT / "deploy" / "prometheus" / "plural-cancel.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "plural-cancel.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "plural-cancel.dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

RUNBOOK_BASE = "https://docs.example.test/plural-cancel/operations.html"
"""The external label ``runbook_base`` the live Prometheus runs with."""

BREAKER_ALERT = "PluralCancelBreakerOpen"
LIVE_THRESHOLDS = {BREAKER_ALERT: ("> 300", "> 2")}
"""The live test's rules are the real ones with these thresholds swapped in (each must occur
exactly once in its alert's expression) and no ``for:``: seconds, not minutes, of outage."""

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$account": ".*"}
"""What Grafana would put in a panel's query, for evaluating it in Prometheus."""

BREAKER_SETTINGS = dict(BREAKER_MIN_LINKS="3", BREAKER_WINDOW="1", BREAKER_COOLDOWN="120", CANCEL_RETRY_BASE="0.2",
                        CANCEL_RETRY_CAP="0.5")
"""Three links failing within a second open the breaker, which then stays open (no probe for 2 minutes)."""


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make prometheus` installs Debian's prometheus package")
    return path


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) of every target of every panel."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The product's metric names a PromQL expression reads (all of them start ``plural_cancel_``)."""
    return set(re.findall(r"\b(plural_cancel_[a-zA-Z0-9_]+)", expr))


def slug(heading: str) -> str:
    """A heading's anchor as MyST (``myst_heading_anchors``) and GitHub make it."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


# -- the rules on their own ----------------------------------------------------------------

def test_promtool_checks_the_rules():
    done = subprocess.run([binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_pass():
    done = subprocess.run([binary("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          cwd=RULE_TESTS.parent)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alerts():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']}: no case where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']}: no case where it stays quiet"


def test_every_alert_has_a_runbook_entry():
    """Each alert's ``runbook_url`` is ``runbook_base`` and an anchor of docs/operations.md, whose
    section says what the alert means, what to look at and what to do."""
    text = OPERATIONS.read_text()
    sections = {slug(m.group(1)): m.end() for m in re.finditer(r"^#{2,4} (.+)$", text, re.M)}
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("{{ $externalLabels.runbook_base }}#"), url
        anchor = url.split("#", 1)[1]
        assert anchor == rule["alert"].lower() and anchor in sections, f"{rule['alert']}: no section #{anchor}"
        body = text[sections[anchor]:]
        body = body[:m.start()] if (m := re.search(r"^#{2,4} ", body, re.M)) else body
        for part in ("**What it means**", "**What to look at**", "**What to do**"):
            assert part in body, f"{rule['alert']}'s runbook entry has no {part}"


# -- the oldest live cancel, as the ledger answers it ----------------------------------------

def test_the_oldest_live_age_follows_enqueues_holds_pumps_ends_requeues_and_deletions(redis_url):
    from plural_cancel.worker.ledger_lua import FINISH_FN

    app = use_settings(redis_url)
    ledger, keys, r = app.runtime.ledger, app.runtime.keys, app.runtime.redis

    def oldest(*accounts):
        return ledger.oldest_live(accounts or ("default",))

    def end(rid, link, state="succeeded", outcome="cancelled"):
        assert claim(ledger, rid, link, "o", 30).verdict == "claimed"
        run(r, FINISH_FN, "finish", *ledger.finish_call(rid, link, "o", state=state, outcome=outcome, attempted=True))

    def created(rid):
        return float(r.hget(keys.record(rid), "created_at"))

    def redis_now():
        seconds, micros = r.time()
        return seconds + micros / 1e6

    assert oldest("default", "acme") == {"default": None, "acme": None}
    # Held: in the backlog only, never in the live index (bytes per pending cancel).
    ledger.create_many([("held-1", "pl-1"), ("held-2", "pl-2")], hold=True)
    assert r.zcard(keys.live) == 0
    age = oldest()["default"]
    assert age == pytest.approx(redis_now() - created("held-1"), abs=0.05)
    time.sleep(0.05)
    # Published at once: in the live index; the held one is older still.
    ledger.create_many([("now-1", "pl-3")])
    ledger.create_many([("follower", "pl-3")])  # follows now-1's link: live too, ends with it
    assert r.zcard(keys.live) == 2
    assert oldest()["default"] == pytest.approx(redis_now() - created("held-1"), abs=0.05)
    # Another account's cancels are its own.
    ledger.create_many([("acme-1", "pl-4")], account="acme")
    assert r.zcard(keys.account_key("acme", "live")) == 1
    assert oldest("acme")["acme"] == pytest.approx(redis_now() - created("acme-1"), abs=0.05)
    # The pump takes the held ones into the due index, and the live index.
    ledger.take_due(0, ahead=60)
    assert r.llen(keys.backlog) == 0 and r.zcard(keys.live) == 4
    assert oldest()["default"] == pytest.approx(redis_now() - created("held-1"), abs=0.05)
    # Ends leave it: the next oldest shows; a leader takes its followers with it.
    end("held-1", "pl-1")
    end("held-2", "pl-2", "failed", "gave_up")
    assert oldest()["default"] == pytest.approx(redis_now() - created("now-1"), abs=0.05)
    end("now-1", "pl-3")
    assert r.zcard(keys.live) == 0 and oldest()["default"] is None
    # A dead letter retried is live again, as old as its record.
    assert ledger.requeue(["held-2"])[0][1] == "requeued"
    assert oldest()["default"] == pytest.approx(redis_now() - created("held-2"), abs=0.05)
    # A record deleted by hand is skipped, and dropped from the index by the read.
    r.delete(keys.record("held-2"))
    assert oldest()["default"] is None and r.zcard(keys.live) == 0


# -- a real worker, and a real Prometheus scraping it ----------------------------------------

@pytest.fixture(scope="module")
def worker(module_redis_url, sandbox_process):
    """A worker serving metrics on a free port, and a producer app beside it."""
    port = free_port()
    sandbox_process.reset_faults()
    env = service_env(module_redis_url, sandbox_process.url, METRICS_PORT=str(port), **BREAKER_SETTINGS)
    process = start_worker(env, concurrency=4)
    app = use_settings(module_redis_url, sandbox_process.url, **BREAKER_SETTINGS)
    yield {"app": app, "sandbox": sandbox_process, "port": port}
    process.stop()
    sandbox_process.reset_faults()


def test_every_metric_the_rules_and_the_dashboard_read_is_served_by_a_worker(worker):
    from plural_cancel.tasks import enqueue_many, get_status

    app, sandbox = worker["app"], worker["sandbox"]
    # A cancel that ends, so that the histograms and counters by outcome have samples too.
    [request_id] = enqueue_many(sandbox.create_links(1, prefix="pl-monitoring-names-"), app=app)
    wait_for(lambda: (get_status(request_id, app=app) or {}).get("state") == "succeeded", 30,
             message="the cancel succeeded")
    text = requests.get(f"http://127.0.0.1:{worker['port']}/metrics", timeout=10).text
    served, sampled = set(), set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        served |= {family.name + suffix for suffix in suffixes}
        sampled |= {sample.name for sample in family.samples}
    used = {name: where for where, expr in [*((rule["alert"], rule["expr"]) for rule in alerts()),
                                            *dashboard_queries()]
            for name in metric_names(expr)}
    missing = {name: where for name, where in used.items() if name not in served}
    assert not missing, f"not served by the worker: {missing}"
    for name in ("plural_cancel_oldest_live_seconds", "plural_cancel_breaker_open_since_seconds",
                 "plural_cancel_enqueue_to_end_seconds_bucket", "plural_cancel_token_refresh_failures_total"):
        assert name in used and name in sampled, name


def live_rules(directory: Path) -> Path:
    """The real rules with ``LIVE_THRESHOLDS`` swapped in, written to ``directory``."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in LIVE_THRESHOLDS:
                real, short = LIVE_THRESHOLDS[rule["alert"]]
                assert rule["expr"].count(real) == 1, f"{rule['alert']}: '{real}' not once in {rule['expr']!r}"
                rule["expr"] = rule["expr"].replace(real, short)
                rule.pop("for", None)
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def prometheus(worker):
    """A real Prometheus on a free port, scraping the worker every second and evaluating the
    live rules every second; yields its base URL."""
    directory = Path(tempfile.mkdtemp(prefix="pc-prometheus-"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                   "external_labels": {"runbook_base": RUNBOOK_BASE}},
        "rule_files": [str(live_rules(directory))],
        "scrape_configs": [{"job_name": "plural-cancel",
                            "static_configs": [{"targets": [f"127.0.0.1:{worker['port']}"]}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen([binary("prometheus"), f"--config.file={directory / 'prometheus.yml'}",
                                f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert process.poll() is None, f"prometheus exited: {(directory / 'prometheus.log').read_text()}"
        try:
            return requests.get(f"{base}/-/ready", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(ready, 20, message="prometheus ready")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def query(base: str, expr: str) -> dict:
    answer = requests.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr!r}: {answer}"
    return answer["data"]


def test_prometheus_fires_the_breaker_alert_in_an_outage_and_evaluates_every_panel(worker, prometheus):
    from plural_cancel.tasks import enqueue_many

    app, sandbox = worker["app"], worker["sandbox"]
    wait_for(lambda: query(prometheus, 'up{job="plural-cancel"} == 1')["result"], 15,
             message="Prometheus scraped the worker")
    sandbox.set_faults(outage=True, faults_skip_token=True)
    enqueue_many(sandbox.create_links(4, prefix="pl-monitoring-down-"), app=app)

    def firing():
        found = requests.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return next((a for a in found if a["labels"]["alertname"] == BREAKER_ALERT and a["state"] == "firing"), None)

    try:
        alert = wait_for(firing, 25, 0.5, message=f"{BREAKER_ALERT} firing in Prometheus's /api/v1/alerts")
    except AssertionError as exc:
        seen = query(prometheus, "plural_cancel_breaker_open_since_seconds")["result"]
        raise AssertionError(f"{exc}; plural_cancel_breaker_open_since_seconds: {seen}") from None
    assert alert["labels"]["account"] == "default"
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#{BREAKER_ALERT.lower()}"

    for title, expr in dashboard_queries():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{title}: a Grafana variable the test does not know in {expr!r}"
        query(prometheus, expr)
    [open_for] = query(prometheus, 'max by (account) (plural_cancel_breaker_open_since_seconds{account=~".*"})')[
        "result"]
    assert float(open_for["value"][1]) > 2
