"""The Plural accounts file (#23, PLURAL_ACCOUNTS_FILE): each rule of the contract's "Many Plural
accounts" refused in one line naming the file, the account and the field, never a secret; and
:class:`AccountBook` re-reading the file as it changes, keeping the last good accounts when a
change is bad.

Real files in ``tmp_path`` and a real ``os.chmod``; time is a stepped clock (the book's ``clock``)."""

from __future__ import annotations

import logging
import os
import time

import pytest

from plural_cancel.config.accounts import (
    ACCOUNT_NAME,
    DEFAULT,
    RELOAD_INTERVAL,
    Account,
    AccountBook,
    AccountsError,
    read_accounts,
)
from plural_cancel.config.settings import PLURAL_BASES, Secret, Settings
from plural_cancel.errors import ConfigError

SECRET = "sh0p-a-s3cret-do-not-leak"
"""An inline secret, recognisable wherever it would leak."""
ENV_SECRET = "sh0p-b-env-s3cret-do-not-leak"
"""A secret held by the variable a ``client_secret_env`` names."""

GOOD = f"""
[accounts.shop-a]
client_id = "cid-a"
client_secret = "{SECRET}"
rate_limit = 5
env = "prod"

[accounts.shop-b]
client_id = "cid-b"
client_secret_env = "SHOP_B_PLURAL_SECRET"
"""


class Clock:
    """Seconds that move only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write(path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def age(path, seconds: float = 60) -> None:
    """Set ``path``'s mtime ``seconds`` back: old enough for its stat to be trusted (RACY_SECONDS)."""
    past = time.time_ns() - int(seconds * 10**9)
    os.utime(path, ns=(past, past))


def settings(path: str | None = None, **env: str) -> Settings:
    return Settings.from_env({**env, **({"PLURAL_ACCOUNTS_FILE": path} if path else {})})


ENVIRON = {"SHOP_B_PLURAL_SECRET": ENV_SECRET}


def refusal(path: str, text: str, environ=ENVIRON, mode: int = 0o600, **env: str) -> str:
    """The one line read_accounts refuses ``text`` with."""
    write_to = write(path, text, mode) if not isinstance(path, str) else path
    with pytest.raises(AccountsError) as info:
        read_accounts(settings(write_to, **env), environ)
    line = str(info.value)
    assert "\n" not in line and SECRET not in line and ENV_SECRET not in line and SECRET not in repr(info.value)
    assert line.startswith(f"PLURAL_ACCOUNTS_FILE ({write_to}): ") and info.value.variable == "PLURAL_ACCOUNTS_FILE"
    return line


# -- read once: the accounts and their defaults ------------------------------------------------------------------


def test_without_the_file_there_is_one_account_default_exactly_as_before():
    base = settings(PLURAL_CLIENT_ID="cid", PLURAL_CLIENT_SECRET="pw", PLURAL_RATE_LIMIT="7")
    accounts = read_accounts(base, {})
    assert list(accounts) == [DEFAULT]
    default = accounts[DEFAULT]
    assert (default.client_id, default.client_secret, default.rate_limit) == ("cid", Secret("pw"), 7.0)
    assert (default.plural_env, default.base_url, default.proxy) == ("uat", PLURAL_BASES["uat"], None)
    assert default.settings(base) == base
    with pytest.raises(ConfigError, match="^PLURAL_CLIENT_SECRET: "):
        read_accounts(settings(PLURAL_CLIENT_ID="cid"), {})


def test_a_producer_host_without_file_or_client_id_has_no_accounts():
    assert read_accounts(settings(), {}) == {}


def test_each_account_takes_its_fields_and_else_the_settings(tmp_path):
    path = write(tmp_path / "accounts.toml", GOOD)
    base = settings(path, PLURAL_BASE_URL="http://127.0.0.1:8800/api", PLURAL_RATE_LIMIT="20",
                    PLURAL_CLIENT_ID="cid-default", PLURAL_CLIENT_SECRET="pw")
    accounts = read_accounts(base, ENVIRON)
    assert sorted(accounts) == ["default", "shop-a", "shop-b"]
    a, b = accounts["shop-a"], accounts["shop-b"]
    assert a == Account("shop-a", "cid-a", Secret(SECRET), 5.0, "prod", PLURAL_BASES["prod"], None)
    # No env and no base_url: the settings' base (PLURAL_BASE_URL here), rate limit and environment.
    assert b == Account("shop-b", "cid-b", Secret(ENV_SECRET), 20.0, "uat", "http://127.0.0.1:8800/api", None)
    assert accounts[DEFAULT].client_id == "cid-default"
    as_a = a.settings(base)
    assert (as_a.client_id, as_a.client_secret.reveal(), as_a.rate_limit) == ("cid-a", SECRET, 5.0)
    assert (as_a.plural_env, as_a.plural_base_url, as_a.plural_proxy) == ("prod", PLURAL_BASES["prod"], None)
    assert as_a.redis_url == base.redis_url and as_a.accounts_file == path


def test_an_accounts_base_url_wins_and_takes_the_proxy_the_environment_names_for_it(tmp_path):
    path = write(tmp_path / "accounts.toml", """
[accounts.local]
client_id = "cid-local"
client_secret = "x"
env = "prod"
base_url = "http://127.0.0.1:8800/api/"
[accounts.far]
client_id = "cid-far"
client_secret = "x"
env = "PROD"
""")
    environ = {"HTTPS_PROXY": "http://user:proxypw@proxy.internal:3128", "HTTP_PROXY": "http://lo-proxy:3128"}
    accounts = read_accounts(Settings.from_env({**environ, "PLURAL_ACCOUNTS_FILE": path}), environ)
    local, far = accounts["local"], accounts["far"]
    assert (local.plural_env, local.base_url, local.proxy) == ("prod", "http://127.0.0.1:8800/api",
                                                               "http://lo-proxy:3128")
    assert (far.plural_env, far.base_url) == ("prod", PLURAL_BASES["prod"])
    assert far.proxy == "http://user:proxypw@proxy.internal:3128" and "proxypw" not in repr(far)
    environ["NO_PROXY"] = ".pluralpay.in"
    assert read_accounts(Settings.from_env({**environ, "PLURAL_ACCOUNTS_FILE": path}), environ)["far"].proxy is None


# -- the file's rules, each refused in one line ----------------------------------------------------------------


def test_a_missing_or_unreadable_file_stops_start_up(tmp_path):
    missing = str(tmp_path / "nowhere.toml")
    line = refusal(missing, "")
    assert "PLURAL_ACCOUNTS_FILE" in line and missing in line and "No such file" in line
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "must be a readable file of [accounts.NAME] tables (Is a directory)" in refusal(str(folder), "")


def test_only_a_regular_file_of_utf8_up_to_a_mebibyte_is_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "must be a regular file" in refusal(str(fifo), "")  # and does not wait for a writer
    latin1 = tmp_path / "a.toml"
    latin1.write_bytes("# café\n".encode("latin-1"))
    assert "must be UTF-8 text (byte 5 is not)" in refusal(str(latin1), "")
    assert "must be a file of at most 1048576 bytes" in refusal(tmp_path / "b.toml", "#" * (1 << 20) + "\n")


def test_a_toml_syntax_error_names_the_file_and_where(tmp_path):
    line = refusal(tmp_path / "a.toml", f'[accounts.shop-a]\nclient_secret = "{SECRET}"\nclient_id = \n')
    assert "valid TOML" in line and "line 3, column 13" in line


def test_the_top_level_holds_only_accounts(tmp_path):
    assert "(got 'client_id')" in refusal(tmp_path / "a.toml", 'client_id = "x"\n[accounts.a]\nclient_id = "y"\n')
    assert "'accounts' is not a table" in refusal(tmp_path / "b.toml", "accounts = 5\n")


def test_an_account_is_a_table(tmp_path):
    line = refusal(tmp_path / "a.toml", f'[accounts]\nshop-a = "{SECRET}"\n')
    assert "account 'shop-a': must be a table, [accounts.shop-a]" in line


@pytest.mark.parametrize("name", ["shop a", "shöp", "a.b", "", "x" * 51, "y" * 200])
def test_an_account_name_is_1_to_50_of_letters_digits_dash_underscore(tmp_path, name):
    line = refusal(tmp_path / "a.toml", f'[accounts."{name}"]\nclient_id = "x"\nclient_secret = "y"\n')
    assert "1-50 characters of A-Z a-z 0-9 _ -" in line
    shown = name if len(name) <= 60 else name[:57] + "..."
    assert f"account {shown!r}: must be an account named" in line
    assert len(name) <= 60 or name not in line


def test_a_name_of_50_is_accepted(tmp_path):
    name = "a-Z_9" * 10
    assert ACCOUNT_NAME.fullmatch(name)
    path = write(tmp_path / "a.toml", f'[accounts.{name}]\nclient_id = "x"\nclient_secret = "y"\n')
    assert list(read_accounts(settings(path), {})) == [name]


BAD_FIELDS = [
    # (the account's lines beside client_id and the secret, the field named, what the line says)
    ('rate_limt = 5', "rate_limt", "one of the fields client_id, client_secret, client_secret_env, rate_limit"),
    ('"rate\\nlimit" = 5', "'rate\\nlimit'", "one of the fields client_id"),
    (f'"{"x" * 70}" = 5', repr("x" * 57 + "..."), "one of the fields client_id"),
    ('rate_limit = "5"', "rate_limit", "a number from 0.01 to 10000 calls per second, a TOML number (got 'a string')"),
    ("rate_limit = true", "rate_limit", "(got 'a boolean')"),
    ("rate_limit = 0", "rate_limit", "a number from 0.01 to 10000 calls per second (got '0')"),
    ("rate_limit = 10001", "rate_limit", "(got '10001')"),
    ("rate_limit = nan", "rate_limit", "a number from 0.01 to 10000"),
    ("rate_limit = inf", "rate_limit", "a number from 0.01 to 10000"),
    ('env = "staging"', "env", "one of uat, prod (got 'staging')"),
    ("env = 1", "env", "a string in quotes (got 'an integer')"),
    ('base_url = "http://example.com/api"', "base_url", "an https URL (plain http only to a loopback host"),
    ('base_url = "ftp://example.com/api"', "base_url", "an http(s) URL such as https://host/api"),
    ('base_url = "https://user:pw@example.com/api"', "base_url", "a URL without credentials in it"),
    ('base_url = "https://example.com:0/api"', "base_url", "its port a number from 1 to 65535"),
    ('base_url = "https://example.com/a\\npi"', "base_url", "without control characters"),
    ("base_url = 5", "base_url", "a string in quotes"),
]


@pytest.mark.parametrize("lines, field, says", BAD_FIELDS, ids=[case[0] for case in BAD_FIELDS])
def test_a_bad_field_is_refused_naming_the_account_and_the_field(tmp_path, lines, field, says):
    text = f'[accounts.ok]\nclient_id = "cid-ok"\nclient_secret = "x"\n' \
           f'[accounts.shop-a]\nclient_id = "cid-a"\nclient_secret = "{SECRET}"\n{lines}\n'
    line = refusal(tmp_path / "a.toml", text)
    assert line.startswith(f"PLURAL_ACCOUNTS_FILE ({tmp_path / 'a.toml'}): account 'shop-a': {field}: must be ")
    assert says in line, line
    assert "PLURAL_BASE_URL" not in line and "PLURAL_RATE_LIMIT" not in line


CREDENTIALS = [
    ("", "client_id", "set to the account's client id"),
    ('client_id = ""\nclient_secret = "s"', "client_id", "a non-empty string"),
    ('client_id = 42\nclient_secret = "s"', "client_id", "a string in quotes"),
    ('client_id = "a\\u0000b"\nclient_secret = "s"', "client_id", "without control characters"),
    (f'client_id = "{"c" * 201}"\nclient_secret = "s"', "client_id", "at most 200 characters"),
    ('client_id = "c"', "client_secret", "set, or client_secret_env set to the name of the variable"),
    (f'client_id = "c"\nclient_secret = "{SECRET}"\nclient_secret_env = "SHOP_B_PLURAL_SECRET"',
     "client_secret_env", "unset when client_secret is set"),
    ('client_id = "c"\nclient_secret = "  "', "client_secret", "a non-empty string"),
    ('client_id = "c"\nclient_secret_env = "NOT A NAME"', "client_secret_env",
     "an environment variable's name (1-100 of A-Z a-z 0-9 _, not starting with a digit) (got 'NOT A NAME')"),
    ('client_id = "c"\nclient_secret_env = "SHOP_C_UNSET"', "client_secret_env",
     "a variable set in the workers' environment (SHOP_C_UNSET is unset or empty)"),
    ('client_id = "c"\nclient_secret_env = "SHOP_EMPTY"', "client_secret_env", "(SHOP_EMPTY is unset or empty)"),
]


@pytest.mark.parametrize("lines, field, says", CREDENTIALS, ids=[case[1] + ":" + case[2] for case in CREDENTIALS])
def test_credentials_are_a_client_id_and_exactly_one_secret(tmp_path, lines, field, says):
    line = refusal(tmp_path / "a.toml", f"[accounts.shop-a]\n{lines}\n", environ={**ENVIRON, "SHOP_EMPTY": " "})
    assert line.startswith(f"PLURAL_ACCOUNTS_FILE ({tmp_path / 'a.toml'}): account 'shop-a': {field}: must be ")
    assert says in line, line


def test_a_secret_never_shows_in_an_error_a_repr_or_a_log(tmp_path, caplog):
    path = tmp_path / "a.toml"
    # A bad field beside each kind of secret: the file's own, and a variable's.
    for bad in ("rate_limit = -1", 'env = "nope"', 'base_url = "http://10.0.0.1/api"', "typo = 1"):
        refusal(path, GOOD + bad + "\n")
    good = write(path, GOOD)
    accounts = read_accounts(settings(good), ENVIRON)
    for account in accounts.values():
        for text in (repr(account), str(account), repr(accounts), repr(account.settings(settings(good)))):
            assert SECRET not in text and ENV_SECRET not in text
    book = AccountBook(settings(good), ENVIRON, clock=Clock())
    write(path, GOOD.replace("rate_limit = 5", "rate_limit = 0"))
    with caplog.at_level(logging.DEBUG):
        assert book.refresh(force=True) is False
    assert book.failures == 1 and caplog.records
    assert SECRET not in caplog.text and ENV_SECRET not in caplog.text


def test_a_file_with_an_inline_secret_must_be_its_owners_alone(tmp_path):
    path = tmp_path / "a.toml"
    for mode in (0o644, 0o640, 0o604):
        line = refusal(path, GOOD, mode=mode)
        assert "account 'shop-a': client_secret: must be in a file only its owner may read" in line
        assert f"chmod 600 {path}" in line and f"it is {mode:03o}" in line
    # Even when a field is bad too: the permissions are judged first.
    assert "chmod 600" in refusal(path, GOOD + "typo = 1\n", mode=0o644)
    assert sorted(read_accounts(settings(write(path, GOOD, 0o600)), ENVIRON)) == ["shop-a", "shop-b"]
    assert sorted(read_accounts(settings(write(path, GOOD, 0o400)), ENVIRON)) == ["shop-a", "shop-b"]
    # Without an inline secret it may be read by anyone: it holds only names of variables.
    no_inline = '[accounts.shop-b]\nclient_id = "cid-b"\nclient_secret_env = "SHOP_B_PLURAL_SECRET"\n'
    assert list(read_accounts(settings(write(path, no_inline, 0o644)), ENVIRON)) == ["shop-b"]


def test_default_from_the_environment_and_the_file_at_once_is_refused(tmp_path):
    text = '[accounts.default]\nclient_id = "cid-file"\nclient_secret = "s"\n'
    line = refusal(tmp_path / "a.toml", text, PLURAL_CLIENT_ID="cid-env", PLURAL_CLIENT_SECRET="pw")
    assert "account 'default'" in line and "PLURAL_CLIENT_ID" in line
    # Without PLURAL_CLIENT_ID the file's default is the default.
    accounts = read_accounts(settings(str(tmp_path / "a.toml")), {})
    assert accounts[DEFAULT].client_id == "cid-file"


def test_one_client_id_on_one_plural_is_one_account(tmp_path):
    two = '[accounts.a]\nclient_id = "cid-twice"\nclient_secret = "s"\n' \
          '[accounts.b]\nclient_id = "cid-twice"\nclient_secret = "t"\n'
    line = refusal(tmp_path / "a.toml", two)
    assert "account 'b': client_id: must be" in line and "account 'a'" in line and "cid-twice" not in line
    # The same id on another Plural (uat and prod) is another account.
    assert sorted(read_accounts(settings(write(tmp_path / "b.toml", two + 'env = "prod"\n')), {})) == ["a", "b"]
    # The default counts too.
    line = refusal(tmp_path / "c.toml", two.split("[accounts.b]")[0], PLURAL_CLIENT_ID="cid-twice",
                   PLURAL_CLIENT_SECRET="x")
    assert "account 'a': client_id" in line and "account 'default'" in line


def test_a_file_without_accounts_needs_default_from_the_environment(tmp_path):
    for text in ("", "[accounts]\n", "# nothing yet\n"):
        assert "no accounts" in refusal(tmp_path / "a.toml", text)
        accounts = read_accounts(settings(str(tmp_path / "a.toml"), PLURAL_CLIENT_ID="c", PLURAL_CLIENT_SECRET="s"), {})
        assert list(accounts) == [DEFAULT]


# -- AccountBook: the file re-read as it changes -----------------------------------------------------------------

SHOP_C = '\n[accounts.shop-c]\nclient_id = "cid-c"\nclient_secret = "c-secret"\n'


def book_of(tmp_path, text: str = GOOD, environ=ENVIRON, **kwargs) -> tuple[AccountBook, Clock, object]:
    path = tmp_path / "accounts.toml"
    write(path, text)
    clock = Clock()
    return AccountBook(settings(str(path)), environ, clock=clock, **kwargs), clock, path


def test_a_book_reads_at_construction_and_a_bad_file_stops_start_up(tmp_path):
    book, _, _ = book_of(tmp_path)
    assert book.names() == ("shop-a", "shop-b") and (book.generation, book.failures) == (0, 0)
    assert book.get("shop-a").client_secret == Secret(SECRET) and book.get("nobody") is None
    copy = book.accounts()
    copy.clear()
    assert book.names() == ("shop-a", "shop-b")
    with pytest.raises(AccountsError, match="account 'shop-a': rate_limit"):
        book_of(tmp_path, GOOD.replace("rate_limit = 5", "rate_limit = -5"))


def test_an_account_added_to_the_file_is_used_after_the_reload_interval(tmp_path):
    book, clock, path = book_of(tmp_path)
    write(path, GOOD + SHOP_C)
    clock.advance(RELOAD_INTERVAL - 0.1)
    assert book.refresh() is False and "shop-c" not in book.names()
    clock.advance(0.1)
    assert book.refresh() is True
    assert book.names() == ("shop-a", "shop-b", "shop-c") and book.generation == 1
    assert book.get("shop-c").client_id == "cid-c"
    # Looked at just now: not again before the interval.
    write(path, GOOD)
    assert book.refresh() is False and book.generation == 1


def test_a_removed_account_is_gone_after_refresh(tmp_path):
    book, clock, path = book_of(tmp_path, GOOD + SHOP_C)
    write(path, GOOD)
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is True and book.names() == ("shop-a", "shop-b") and book.get("shop-c") is None
    assert book.generation == 1


def test_a_changed_secret_is_a_changed_account_and_a_touch_is_no_change(tmp_path):
    book, clock, path = book_of(tmp_path)
    before = book.get("shop-a")
    write(path, GOOD.replace(SECRET, SECRET.upper()))
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is True and book.generation == 1
    assert book.get("shop-a") != before and book.get("shop-a").client_secret.reveal() == SECRET.upper()
    os.utime(path)
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is False and book.generation == 1


def test_a_file_turned_bad_keeps_the_last_good_accounts_until_it_is_mended(tmp_path, caplog):
    failed = []
    book, clock, path = book_of(tmp_path, on_reload_failure=failed.append)
    good = book.accounts()
    write(path, GOOD + SHOP_C.replace('client_id = "cid-c"', 'client_id = "cid-c"\nrate_limit = 0'))
    clock.advance(RELOAD_INTERVAL)
    with caplog.at_level(logging.ERROR, logger="plural_cancel.config.accounts"):
        assert book.refresh() is False
    assert book.accounts() == good and (book.generation, book.failures) == (0, 1)
    assert len(failed) == 1 and isinstance(failed[0], AccountsError) and failed[0].field == "rate_limit"
    [record] = caplog.records
    assert record.name == "plural_cancel.config.accounts" and record.levelno == logging.ERROR
    message = record.getMessage()
    assert "\n" not in message and "account 'shop-c': rate_limit: must be" in message and str(path) in message
    assert SECRET not in caplog.text
    # Unchanged, it is not counted or logged again (read once more at most: its stat was too recent to trust).
    for _ in range(3):
        clock.advance(RELOAD_INTERVAL)
        with caplog.at_level(logging.ERROR, logger="plural_cancel.config.accounts"):
            assert book.refresh() is False
    assert book.failures == 1 and len(failed) == 1 and len(caplog.records) == 1
    # Mended: read at the next look.
    write(path, GOOD + SHOP_C)
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is True and "shop-c" in book.names() and (book.generation, book.failures) == (1, 1)


def test_chmod_600_mends_a_file_refused_for_its_permissions(tmp_path):
    book, clock, path = book_of(tmp_path)
    write(path, GOOD + SHOP_C, mode=0o644)
    age(path)
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is False and book.failures == 1 and "shop-c" not in book.names()
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is False and book.failures == 1
    os.chmod(path, 0o600)  # the content, its size and its mtime unchanged
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is True and "shop-c" in book.names()


def test_a_removed_file_keeps_the_last_good_accounts(tmp_path, caplog):
    book, clock, path = book_of(tmp_path)
    good = book.accounts()
    os.remove(path)
    for _ in range(3):
        clock.advance(RELOAD_INTERVAL)
        with caplog.at_level(logging.ERROR, logger="plural_cancel.config.accounts"):
            assert book.refresh() is False
    assert book.accounts() == good and book.failures == 1 and len(caplog.records) == 1
    assert "No such file" in caplog.records[0].getMessage()
    write(path, GOOD + SHOP_C)
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is True and "shop-c" in book.names()


def test_an_unknown_name_looks_at_the_file_at_once_but_once_a_second(tmp_path):
    book, clock, path = book_of(tmp_path)
    write(path, GOOD + SHOP_C)
    assert book.get("shop-c").client_id == "cid-c"  # no wait for the reload interval
    assert book.generation == 1
    write(path, GOOD + SHOP_C + SHOP_C.replace("shop-c", "shop-d").replace("cid-c", "cid-d"))
    clock.advance(0.5)
    for _ in range(100):  # a flood of unknown names within the second: no look at all
        assert book.get("shop-d") is None and book.get("nobody") is None
    clock.advance(0.5)
    assert book.get("shop-d").client_id == "cid-d" and book.generation == 2
    # Without a file there is nothing to look at.
    alone = AccountBook(settings(PLURAL_CLIENT_ID="c", PLURAL_CLIENT_SECRET="s"), {}, clock=clock)
    assert alone.get("shop-a") is None and alone.refresh(force=True) is False and alone.names() == (DEFAULT,)


def test_force_reads_now_whatever_the_interval_and_the_stat(tmp_path):
    environ = dict(ENVIRON)
    book, clock, path = book_of(tmp_path, environ=environ)
    later = '\n[accounts.shop-e]\nclient_id = "cid-e"\nclient_secret_env = "SHOP_E_SECRET"\n'
    write(path, GOOD + later)
    assert book.refresh(force=True) is False and book.failures == 1  # SHOP_E_SECRET is not set yet
    environ["SHOP_E_SECRET"] = "e-secret"
    assert book.refresh() is False  # the interval has not passed, and the file did not change
    assert book.refresh(force=True) is True and book.get("shop-e").client_secret.reveal() == "e-secret"


def test_an_account_added_at_run_time_takes_its_secret_from_a_variable_the_environment_has(tmp_path):
    environ = {**ENVIRON, "SHOP_F_SECRET": "f-secret"}
    book, clock, path = book_of(tmp_path, environ=environ)
    write(path, GOOD + '\n[accounts.shop-f]\nclient_id = "cid-f"\nclient_secret_env = "SHOP_F_SECRET"\n'
                       'rate_limit = 2\n')
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is True
    shop_f = book.get("shop-f")
    assert (shop_f.client_secret.reveal(), shop_f.rate_limit) == ("f-secret", 2.0)


def test_a_change_within_the_timestamps_granularity_is_not_missed(tmp_path):
    """Two versions of one size with one mtime (written within a jiffy): the first was read while
    its mtime was recent, so its stat was not trusted, and the second is read at the next look."""
    book, clock, path = book_of(tmp_path)
    recent = os.stat(path).st_mtime_ns
    write(path, GOOD.replace("cid-a", "cid-A"))
    os.utime(path, ns=(recent, recent))
    clock.advance(RELOAD_INTERVAL)
    assert book.refresh() is True and book.get("shop-a").client_id == "cid-A"


def test_the_os_environment_is_read_when_no_environ_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOP_B_PLURAL_SECRET", "from-os-environ")
    path = write(tmp_path / "a.toml", GOOD)
    book = AccountBook(settings(path), clock=Clock())
    assert book.get("shop-b").client_secret.reveal() == "from-os-environ"
