"""``plural-cancel bulk FILE``: parsing, and the command itself (its console script's ``main``,
run in this process: ``tests/support/cli.py``).

No worker: what ``bulk`` did is read from the ledger records and the queue's length.
``tests/test_beat.py`` follows a ``bulk --wait`` through a real worker.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone

import pytest

from plural_cancel.config.settings import Settings
from tests.conftest import use_settings
from tests.support import cli

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)


def run_cli(redis_url: str, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLURAL_", "SENTRY_", "CANCEL_"))}
    env.update(settings, REDIS_URL=redis_url)
    return cli.run(env, *args)


def record_count(redis_client) -> int:
    return sum(1 for _ in redis_client.scan_iter("plural-cancel:req:*", count=5000))


def test_plain_lines_comments_blanks_duplicates_and_bad_ones():
    from plural_cancel.cli.schedule import read_link_file

    parsed = read_link_file(["# nightly clean-up\n", "pl-1\n", "\n", "  pl-2  \n", "pl 3\n", "pl-1\n",
                             "   # indented comment\n", "../x\r\n", "pl-4"])
    assert parsed.links == ["pl-1", "pl-2", "pl-4"]
    assert parsed.duplicates == 1
    assert [n for n, _ in parsed.invalid] == [5, 8]
    assert all(reason.startswith("payment_link_id:") for _, reason in parsed.invalid)


def test_a_csv_with_a_payment_link_id_column():
    from plural_cancel.cli.schedule import read_link_file

    parsed = read_link_file(["# exported\n", "order_id,payment_link_id,amount\n", "o-1,pl-c1,100\n",
                             "o-2,,100\n", "\n", "o-3, pl-c3 ,100\n", "o-4\n", "o-5,pl-c1,5\n"])
    assert parsed.links == ["pl-c1", "pl-c3"]
    assert [n for n, _ in parsed.invalid] == [4, 7]
    assert parsed.duplicates == 1


def test_an_empty_file_holds_nothing():
    from plural_cancel.cli.schedule import read_link_file

    parsed = read_link_file(["# only a comment\n", "\n"])
    assert (parsed.links, parsed.invalid, parsed.duplicates) == ([], [], 0)


def test_bulk_of_10000_lines_names_the_3_bad_ones_and_enqueues_the_rest(redis_url, redis_client, tmp_path):
    bad = {17: "pl bad space", 5000: "x" * 51, 9999: "pl/../slash"}
    lines = [bad.get(n, f"pl-bulk-{n:05d}") for n in range(1, 10_001)]
    path = tmp_path / "links.txt"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ids.csv"

    result = run_cli(redis_url, "bulk", str(path), "--output", str(out))

    assert result.returncode == 2, result.stderr
    named = [line for line in result.stderr.splitlines() if " line " in line]
    assert [line.split(" line ")[1].split(":")[0] for line in named] == ["17", "5000", "9999"]
    assert all("payment_link_id: must be" in line for line in named)
    assert "3 lines bad, skipped; the other 9997 links were enqueued" in result.stderr.splitlines()[-1]
    assert result.stdout.splitlines() == ["accepted    9997", "duplicates  0", "invalid     3",
                                          "backlog     9,997 enqueued; with 9,997 waiting in all, "
                                          "about 17 min at 10/s"]
    # Two seconds' worth at the paced 10/s is sent at once; the rest waits in the ledger.
    assert redis_client.llen(QUEUE) == 19 and redis_client.llen("plural-cancel:backlog") == 9997 - 19
    assert record_count(redis_client) == 9997
    written = [row.split(",") for row in out.read_text().splitlines()]
    assert len(written) == 9997 and {link for link, _ in written} == set(lines) - set(bad.values())
    link, request_id = written[123]
    assert redis_client.hget(f"plural-cancel:req:{request_id}", "payment_link_id").decode() == link


def test_duplicates_are_enqueued_once_and_a_clean_file_exits_0(redis_url, redis_client, tmp_path):
    path = tmp_path / "links.csv"
    path.write_text("payment_link_id\npl-d1\npl-d2\npl-d1\n\n# done\n")
    result = run_cli(redis_url, "bulk", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["accepted    2", "duplicates  1", "invalid     0"]
    assert redis_client.llen(QUEUE) == 2 and record_count(redis_client) == 2


@pytest.mark.parametrize("waiting, lines, rate, says", [
    (30, 50, "2", "50 enqueued; with 80 waiting in all, about 40 s at 2/s"),
    (1200, 1200, "10", "1,200 enqueued; with 2,400 waiting in all, about 4 min at 10/s"),
    (0, 3000, "0.5", "3,000 enqueued; with 3,000 waiting in all, about 1 h 40 min at 0.5/s"),
])
def test_bulk_says_how_long_its_backlog_takes_at_the_rate_limit(redis_url, tmp_path, waiting, lines, rate, says):
    """No worker: the cancels enqueued before (another producer's) wait in the ledger with the file's."""
    from plural_cancel.tasks import enqueue_many

    if waiting:
        enqueue_many([f"pl-before-{n}" for n in range(waiting)], app=use_settings(redis_url))
    path = tmp_path / "links.txt"
    path.write_text("".join(f"pl-est-{n}\n" for n in range(lines)))
    result = run_cli(redis_url, "bulk", str(path), PLURAL_RATE_LIMIT=rate)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"backlog     {says}"


@pytest.mark.parametrize("content, args, message", [
    ("pl-ok\npl bad\n", ["--strict"], "1 line bad; nothing enqueued (--strict)"),
    ("pl bad\n../x\n", [], "no valid payment link ids (2 lines bad)"),
    ("# nothing\n\n", [], "no valid payment link ids (0 lines bad)"),
])
def test_nothing_is_enqueued_when_refused(redis_url, redis_client, tmp_path, content, args, message):
    path = tmp_path / "links.txt"
    path.write_text(content)
    result = run_cli(redis_url, "bulk", str(path), *args)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(message)
    assert redis_client.dbsize() == 0


def cli_in_process(monkeypatch, capsys, redis_url: str, *args: str) -> tuple[int, str, str]:
    """The console script's own entry point, in this process (a subprocess costs a second an import)."""
    from plural_cancel.cli import main

    monkeypatch.setenv("REDIS_URL", redis_url)
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_schedule_and_unschedule_from_the_command_line(redis_url, redis_client, monkeypatch, capsys):
    status, out, err = cli_in_process(monkeypatch, capsys, redis_url, "schedule", "pl-cli-1",
                                      "--at", "2031-01-01T05:30:00+05:30")
    assert status == 0, err
    request_id = out.strip()
    assert redis_client.hget("plural-cancel:schedule:link:pl-cli-1", "request_id").decode() == request_id
    assert redis_client.zscore("plural-cancel:schedule", "pl-cli-1") == 1924992000.0

    status, out, _ = cli_in_process(monkeypatch, capsys, redis_url, "schedule", "pl-cli-1",
                                    "--at", "2031-01-02T00:00:00Z")
    assert (status, out.strip()) == (0, request_id)

    for link, at, message in (("pl-cli-1", "2031-01-01T00:00:00", "--at: needs a timezone"),
                              ("pl-cli-1", "tomorrow", "--at: must be"),
                              ("pl cli", "2031-01-01T00:00:00Z", "payment_link_id: must be")):
        status, _, err = cli_in_process(monkeypatch, capsys, redis_url, "schedule", link, "--at", at)
        assert status == 2 and message in err and len(err.splitlines()) == 1

    status, out, _ = cli_in_process(monkeypatch, capsys, redis_url, "unschedule", "pl-cli-1")
    assert status == 0 and "will not be cancelled" in out
    status, _, err = cli_in_process(monkeypatch, capsys, redis_url, "unschedule", "pl-cli-1")
    assert status == 1 and "nothing scheduled for pl-cli-1" in err
    assert redis_client.zcard("plural-cancel:schedule") == 0


def test_unschedule_after_it_fired_says_too_late_and_names_the_request_id(redis_url, monkeypatch, capsys):
    from plural_cancel.tasks import schedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    app = use_settings(redis_url)
    request_id = schedule_cancel("pl-late", datetime(2020, 1, 1, tzinfo=timezone.utc), app=app)
    assert fire_schedules(app) == 1
    status, _, err = cli_in_process(monkeypatch, capsys, redis_url, "unschedule", "pl-late")
    assert status == 1
    assert "too late" in err and request_id in err


def test_a_file_that_is_not_utf8_is_named_with_its_line_and_byte_and_nothing_is_enqueued(redis_url, redis_client,
                                                                                        tmp_path):
    """Every line is read before anything is written: a bad byte on line 3 leaves lines 1-2 unsent too."""
    path = tmp_path / "links.txt"
    path.write_bytes(b"pl-ok-1\npl-ok-2\r\npl-\xffbad\npl-ok-3\n")
    result = run_cli(redis_url, "bulk", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"plural-cancel: {path} line 3, byte 4: not UTF-8 text (0xff); nothing enqueued\n"
    assert redis_client.dbsize() == 0


def test_a_bad_setting_is_refused_before_the_file_is_read_or_anything_enqueued(redis_url, redis_client, tmp_path):
    """PLURAL_RATE_LIMIT=1e-320 once enqueued the whole file, then failed on the summary's estimate."""
    path = tmp_path / "links.txt"
    path.write_text("pl-ok-1\npl bad\n")  # a bad line too: its own line must not come first
    result = run_cli(redis_url, "bulk", str(path), PLURAL_RATE_LIMIT="1e-320")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("plural-cancel: configuration error: PLURAL_RATE_LIMIT: must be a number from 0.01 to "
                             "10000 calls per second (got '1e-320')\n")
    assert redis_client.dbsize() == 0
