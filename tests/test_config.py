"""The config contract as ops meet it: `mailgate --config PATH check-config` and friends."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from mailgate.config import load_config
from mailgate.errors import ConfigError
from mailgate.store import store_for
from tests.conftest import REPO, run_cli, tmpfs, write_config

EX_CONFIG = 78
EX_USAGE = 2


def edit_config(path: Path, section: str, key: str, value: str | None) -> Path:
    """Set `key = value` (TOML text) in `[section]` of the file at `path`; None removes it."""
    out: list[str] = []
    current = ""
    done = False
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if current == section and not done and value is not None:
                out.append(f"{key} = {value}")
                done = True
            current = stripped[1:-1]
            out.append(line)
            continue
        if current == section and stripped.split("=", 1)[0].strip() == key:
            if value is not None:
                out.append(f"{key} = {value}")
            done = True
            continue
        out.append(line)
    if not done and value is not None:
        if current != section:
            out.append(f"[{section}]")
        out.append(f"{key} = {value}")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(path), "check-config")


def assert_config_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    """Exit 78, nothing on stdout, one line on stderr that names every one of `names`."""
    assert result.returncode == EX_CONFIG, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]


def test_shipped_config_is_valid() -> None:
    shipped = REPO / "config.toml"
    result = check(shipped)
    assert result.returncode == 0, result.stderr
    assert str(shipped) in result.stdout
    assert "OK" in result.stdout
    assert result.stderr == ""


def test_test_config_is_valid(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"{path}: OK"


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = edit_config(write_config(tmp_path), "smtp", "lisen", '"127.0.0.1:25"')
    assert_config_error(check(path), "smtp.lisen")


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = edit_config(write_config(tmp_path), "smtpd", "listen", '"127.0.0.1:25"')
    assert_config_error(check(path), "smtpd")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("smtp", "listen", '"nonsense"'),
        ("smtp", "listen", '"127.0.0.1:70000"'),
        ("smtp", "max_message_size", "-1"),
        ("smtp", "max_message_size", '"big"'),
        ("smtp", "timeout", "0"),
        ("smtp", "max_connections", "0"),
        ("outbound", "transport", '"carrier-pigeon"'),
        ("smtp", "accept", "[]"),
        ("smtp", "accept", '["not an address"]'),
        ("http", "base_url", '"ftp://x"'),
        ("http", "max_connections", "0"),
        ("http", "keepalive_timeout", "0"),
        ("http", "header_timeout", '"10s"'),
        ("outbound", "sender", '"nope"'),
        ("outbound", "tls", '"ssl"'),
        ("outbound", "acknowledge", '"yes"'),
        ("outbound", "retry_initial", "-5"),
        ("outbound", "auto_reply_limit", "0"),
        ("outbound", "username", '""'),
        ("agents", "addresses", '"agent@example.com"'),
        ("agents", "addresses", '["not an address"]'),
        ("agents", "expose_address", "1"),
        ("verification", "ttl", '"a week"'),
        ("smtp", "trusted_proxies", '"127.0.0.1"'),
        ("smtp", "trusted_proxies", '["127.0.0.1", "not-an-address"]'),
        ("smtp", "trusted_proxies", '["10.0.0.1/8"]'),  # host bits set: which was meant?
        ("smtp", "trusted_proxies", "[2130706433]"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, section: str, key: str, value: str) -> None:
    path = edit_config(write_config(tmp_path), section, key, value)
    assert_config_error(check(path), f"{section}.{key}")


def test_trusted_proxies_are_addresses_and_networks(tmp_path: Path) -> None:
    path = edit_config(
        write_config(tmp_path), "smtp", "trusted_proxies", '["127.0.0.1", "10.0.0.0/8", "::1"]'
    )
    assert check(path).returncode == 0
    smtp = load_config(path).smtp
    for trusted in ("127.0.0.1", "10.200.0.7", "::1", "::ffff:10.0.0.1"):
        assert smtp.trusts(trusted), trusted
    for other in ("127.0.0.2", "11.0.0.1", "::2", "", "unix-socket"):
        assert not smtp.trusts(other), other


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    path = edit_config(write_config(tmp_path), "smtp", "accept", None)
    assert "accept" not in path.read_text(encoding="utf-8")
    assert_config_error(check(path), "smtp.accept")


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[smtp\naccept = ["support@example.com"\n', encoding="utf-8")
    assert_config_error(check(path), str(path))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.toml"
    assert_config_error(check(path), str(path))


def test_env_var_chooses_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "from-env")
    result = run_cli("check-config", env={"MAILGATE_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"{path}: OK"


def test_env_var_pointing_at_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = run_cli("check-config", env={"MAILGATE_CONFIG": str(missing)})
    assert_config_error(result, str(missing))


def test_config_option_wins_over_env_var(tmp_path: Path) -> None:
    chosen = write_config(tmp_path / "chosen")
    broken = tmp_path / "broken.toml"
    broken.write_text("this is not toml\n", encoding="utf-8")
    result = run_cli("--config", str(chosen), "check-config", env={"MAILGATE_CONFIG": str(broken)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"{chosen}: OK"


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    path = write_config(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "config.toml")
    assert config.storage.database == folder.resolve() / "var" / "mailgate.db"
    assert config.storage.attachments == folder.resolve() / "var" / "attachments"
    assert config.outbound.directory == folder.resolve() / "var" / "outbox"
    assert config.path == path.resolve()


def test_cli_finds_the_database_next_to_the_config(tmp_path: Path) -> None:
    """Relative paths are the config file's: from another folder, a read-only command names
    the database next to the config when there is none (exit 1, nothing created anywhere),
    and reads it once the daemon made it."""
    folder = tmp_path / "etc"
    write_config(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def tickets_list() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailgate", "--config", "../etc/config.toml", "tickets", "list"],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "MAILGATE_CONFIG"},
            check=False,
        )

    database = (folder / "var" / "mailgate.db").resolve()
    result = tickets_list()
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"mailgate: no database at {database} (has `mailgate serve` run with this config?)\n"
    )
    assert not (folder / "var").exists() and not (elsewhere / "var").exists()

    asyncio.run(_create_store(folder / "config.toml"))  # as the daemon's first start does
    result = tickets_list()
    assert result.returncode == 0, result.stderr
    assert not (elsewhere / "var").exists()


async def _create_store(config: Path) -> None:
    async with store_for(load_config(config)):
        pass


def test_check_config_warns_of_keys_kept_with_the_data(tmp_path: Path) -> None:
    """No [security] key_file: the generated key sits beside the data, and so does the key
    store; check-config says so on stdout and still passes. Keys set outside: no warning."""
    path = write_config(tmp_path / "etc")
    result = check(path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 2, result.stdout
    assert "[security] key_file is not set" in warnings[0]
    assert "is inside the database's folder" in warnings[1]

    keys = tmp_path / "keys"
    with path.open("a", encoding="utf-8") as config:
        config.write(f'\n[security]\nkey_file = "{keys / "master.key"}"\n')
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout, result.stdout  # the key store defaults beside the key

    edit_config(path, "security", "keystore", '"var/keystore.sqlite"')
    result = check(path)
    assert [line for line in result.stdout.splitlines() if "warning" in line] == [
        f"security: warning: the key store ({tmp_path / 'etc' / 'var' / 'keystore.sqlite'}) is"
        f" inside the database's folder ({tmp_path / 'etc' / 'var'}): a backup of the data then"
        " carries the keys to it; set [security] keystore to a path outside it"
    ]


@pytest.mark.parametrize(
    "command",
    [
        ("tickets", "list"),
        ("tickets", "show", "1"),
        ("quarantine", "list"),
        ("quarantine", "show", "X"),
        ("outbox", "list"),
        ("requesters", "list"),
        ("requesters", "show", "a@example.org"),
    ],
)
def test_a_read_only_command_on_a_missing_database_says_so(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    path = write_config(tmp_path)
    result = run_cli("--config", str(path), *command)
    assert result.returncode == 1, result.stderr
    assert "no database at" in result.stderr and "mailgate.db" in result.stderr
    assert not (tmp_path / "var" / "mailgate.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("frobnicate",),
        ("close",),
        ("tickets", "show"),
        ("tickets", "show", "notanumber"),
        ("close", "notanumber"),
        ("quarantine", "show"),
        ("tickets",),
        ("reply", "1"),
        ("outbox", "list", "--state", "lost"),
        ("outbox", "retry", "x"),
        ("requesters", "show"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run_cli("--config", str(write_config(tmp_path)), *args)
    assert result.returncode == EX_USAGE, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "usage: mailgate" in result.stderr
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("content", [b"", b"\n", b"0123456789"], ids=["empty", "blank", "short"])
def test_an_empty_or_short_secret_file_stops_serve_with_78_naming_it(
    tmp_path: Path, content: bytes
) -> None:
    """A damaged key file is a config error naming the file, not a crash, for the daemon and
    for a command that needs the key alike."""
    path = write_config(tmp_path)
    secret = tmp_path / "var" / "secret.key"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(content)
    for command in (["serve"], ["reply", "1", "--body-file", str(path)]):
        result = run_cli("--config", str(path), *command)
        assert_config_error(result, "outbound.secret_file", str(secret))


@pytest.mark.parametrize(
    ("sender", "extra", "address", "name"),
    [
        ('"support@example.com"', None, "support@example.com", None),
        ('"Example Support <support@example.com>"', None, "support@example.com", "Example Support"),
        (
            '"\\"Support, Team\\" <support@example.com>"',
            None,
            "support@example.com",
            "Support, Team",
        ),
        ('"<support@example.com>"', '"Old Key"', "support@example.com", "Old Key"),
        ('"support@example.com"', '"Example Support"', "support@example.com", "Example Support"),
    ],
)
def test_sender_is_an_address_or_a_name_and_an_address(
    tmp_path: Path, sender: str, extra: str | None, address: str, name: str | None
) -> None:
    """`sender` takes "Name <address>" as mail writes it; `sender_name` still names it."""
    path = edit_config(write_config(tmp_path), "outbound", "sender", sender)
    if extra is not None:
        edit_config(path, "outbound", "sender_name", extra)
    outbound = load_config(path).outbound
    assert (outbound.sender, outbound.sender_name) == (address, name)
    assert check(path).returncode == 0


@pytest.mark.parametrize(
    "sender",
    [
        '"Support <support@example.com"',  # unclosed
        '"Support <support@example.com> trailing"',
        '"A <a@example.com>, B <b@example.com>"',
        '"Support <not an address>"',
        '"Evil\\r\\nBcc: x@example.org <support@example.com>"',
        '"Evil\\u0085 <support@example.com>"',
        '"Evil\\u202e <support@example.com>"',
    ],
)
def test_a_bad_sender_names_outbound_sender(tmp_path: Path, sender: str) -> None:
    path = edit_config(write_config(tmp_path), "outbound", "sender", sender)
    assert_config_error(check(path), "outbound.sender:")


def test_a_name_in_both_sender_and_sender_name_is_refused(tmp_path: Path) -> None:
    """Two names for one sender: which was meant? Refused, naming both keys."""
    path = edit_config(
        write_config(tmp_path), "outbound", "sender", '"Support <support@example.com>"'
    )
    edit_config(path, "outbound", "sender_name", '"Other Name"')
    assert_config_error(check(path), "outbound.sender_name", "outbound.sender")


# -- check-config: the machine as well as the file (issue 11) --


@pytest.mark.parametrize("key", ["smtp.listen", "http.listen"])
def test_check_config_refuses_a_listen_address_in_use(tmp_path: Path, key: str) -> None:
    """A port another process listens on: exit 78 naming the key (a running mailgate holds
    its own ports, so the text asks); once it is let go, the same config is OK."""
    section, name = key.split(".")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = edit_config(write_config(tmp_path), section, name, f'"127.0.0.1:{port}"')
        result = check(path)
        assert_config_error(result, key, f"127.0.0.1:{port}", "is mailgate already running?")
    assert check(path).returncode == 0


def test_check_config_refuses_a_state_folder_it_cannot_make(tmp_path: Path) -> None:
    """A file where the database's folder would be: exit 78, one line naming the keys whose
    files go there (the archive's default is beside the database)."""
    (tmp_path / "state").write_text("not a folder\n")
    path = edit_config(write_config(tmp_path), "storage", "database", '"state/mailgate.db"')
    assert_config_error(check(path), "storage.database", "retention.archive", "is not a folder")


def test_check_config_refuses_a_read_only_folder(tmp_path: Path) -> None:
    """The outbox on a read-only filesystem (as root, whom no mode stops): exit 78 naming
    outbound.directory; a folder that does not exist yet but can be made is fine."""
    outbox = tmp_path / "ro"
    with tmpfs(outbox, "1m"):
        subprocess.run(["mount", "-o", "remount,ro", str(outbox)], check=True)
        path = edit_config(write_config(tmp_path), "outbound", "directory", f'"{outbox}/new"')
        assert_config_error(check(path), "outbound.directory", str(outbox), "new")
    edit_config(path, "outbound", "directory", f'"{tmp_path}/not/yet/there"')
    assert check(path).returncode == 0
    assert not (tmp_path / "not").exists()


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A trustme CA's file, and a certificate of it with its key, as PEM files."""
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    issued = ca.issue_cert("mailgate.test")
    paths = (folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(paths[0]))
    issued.cert_chain_pems[0].write_to_path(str(paths[1]))
    issued.private_key_pem.write_to_path(str(paths[2]))
    return paths


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        ({"smtp": {"tls_cert": '"cert.pem"'}}, "smtp.tls_key"),
        ({"smtp": {"tls_key": '"key.pem"'}}, "smtp.tls_cert"),
        ({"smtp": {"require_tls": "true"}}, "smtp.require_tls"),
        ({"smtp": {"require_tls": '"yes"'}}, "smtp.require_tls"),
        ({"smtp": {"tls_listen": '"127.0.0.1:8465"'}}, "smtp.tls_listen"),
        ({"smtp": {"tls_listen": '"127.0.0.1:8025"', "listen": '"127.0.0.1:8025"',
                   "tls_cert": '"c"', "tls_key": '"k"'}}, "smtp.tls_listen"),
        ({"outbound": {"tls": '"none"', "username": '"mailgate"'}}, "outbound.tls"),
        ({"outbound": {"tls": '"tls"'}}, "outbound.tls"),
    ],
)  # fmt: skip
def test_tls_settings_that_cannot_work_name_their_key(
    tmp_path: Path, lines: dict[str, dict[str, str]], named: str
) -> None:
    """A certificate without its key (or the reverse), require_tls or tls_listen without a
    certificate, a password that would travel in clear: refused, naming the key."""
    path = write_config(tmp_path)
    for section, values in lines.items():
        for key, value in values.items():
            edit_config(path, section, key, value)
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(path)


def test_an_unloadable_certificate_or_ca_file_stops_check_config_and_serve(
    tmp_path: Path, certificate: tuple[Path, Path, Path]
) -> None:
    """Files that exist but do not make a certificate and its key (a key of another
    certificate, a missing file, a CA file that holds none): exit 78 naming the key, from
    check-config and from serve alike; a good pair passes and check-config says so."""
    _, cert, key = certificate
    path = write_config(tmp_path)
    other = trustme.CA().issue_cert("mailgate.test").private_key_pem
    other.write_to_path(str(tmp_path / "other-key.pem"))
    for bad_key in ("other-key.pem", "missing.pem"):
        edit_config(path, "smtp", "tls_cert", f'"{cert}"')
        edit_config(path, "smtp", "tls_key", f'"{tmp_path / bad_key}"')
        for command in ("check-config", "serve"):
            assert_config_error(run_cli("--config", str(path), command), "smtp.tls_cert")
    edit_config(path, "smtp", "tls_key", f'"{key}"')
    passed = check(path)
    assert passed.returncode == 0, passed.stderr
    assert f"smtp: STARTTLS offered with {cert}" in passed.stdout

    edit_config(path, "outbound", "transport", '"smtp"')
    edit_config(path, "outbound", "tls", '"required"')
    edit_config(path, "outbound", "tls_ca_file", f'"{key}"')  # a key, no certificate
    assert_config_error(check(path), "outbound.tls_ca_file")


def test_the_old_starttls_value_still_works_with_a_warning(tmp_path: Path) -> None:
    """`tls = "starttls"` (before "opportunistic" had its name) means what it meant."""
    path = edit_config(write_config(tmp_path), "outbound", "tls", '"starttls"')
    assert load_config(path).outbound.tls == "opportunistic"
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert 'config: warning: outbound.tls: "starttls" is now called "opportunistic"' in (
        result.stdout
    )
    default = load_config(edit_config(path, "outbound", "tls", None))
    assert default.outbound.tls == "opportunistic" and default.warnings == ()
