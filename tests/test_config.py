"""Configuration: TOML + environment overrides, durations, and clear errors."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest

from responder.config import KNOWN_KEYS, ConfigError, load_config, parse_duration
from tests.support import VENV_BIN


def test_durations() -> None:
    assert parse_duration("4d", "k") == dt.timedelta(days=4)
    assert parse_duration("1h30m", "k") == dt.timedelta(minutes=90)
    assert parse_duration(3600, "k") == dt.timedelta(hours=1)
    assert parse_duration("45", "k") == dt.timedelta(seconds=45)
    for bad in ("4x", "", "d4", True):
        with pytest.raises(ConfigError):
            parse_duration(bad, "k")


def test_env_overrides_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('listen = "127.0.0.1:1234"\nresponse_validity = "4d"\ndata_dir = "d"\n')
    cfg = load_config(path, {})
    assert cfg.listen == ("127.0.0.1", 1234)
    assert cfg.data_dir == tmp_path / "d"
    env = {
        "OCSP_RESPONDER_LISTEN": "[::1]:9999",
        "OCSP_RESPONDER_RESPONSE_VALIDITY": "3d",
        "OCSP_RESPONDER_REFRESH_MARGIN": "36h",
        "OCSP_RESPONDER_DATABASE_URL": "postgresql://x/y",
        "OCSP_RESPONDER_ADMIN_TOKEN": "0123456789abcdef0123",
        "OCSP_RESPONDER_ISSUERS": '[{"name": "a", "certificate": "a.pem", "key": "a.key"}]',
    }
    cfg = load_config(path, env)
    assert cfg.listen == ("::1", 9999)
    assert cfg.policy.validity == dt.timedelta(days=3)
    assert cfg.policy.refresh_margin == dt.timedelta(hours=36)
    assert cfg.database_url == "postgresql://x/y"
    assert cfg.admin_token == "0123456789abcdef0123"
    assert cfg.issuers[0].name == "a" and cfg.issuers[0].key == tmp_path / "a.key"
    cfg = load_config(None, {"OCSP_RESPONDER_CONFIG": str(path)})
    assert cfg.listen == ("127.0.0.1", 1234)


def test_ct_logs(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "ct_follow_in_serve = true\n[[ct_logs]]\nname = 'n'\nurl = 'https://l.example/'\n"
        "kind = 'static'\npublic_key = 'AAAA'\norigin = 'l.example'\nbatch_size = 512\n"
        "start_index = 123456789\n"
        "[[ct_logs]]\nurl = 'https://r.example'\nkind = 'rfc6962'\npublic_key = 'BBBB'\n"
        "poll_interval = '30s'\n"
    )
    cfg = load_config(path, {})
    assert cfg.ct_follow_in_serve
    static, rfc = cfg.ct_logs
    assert (static.name, static.url, static.origin, static.batch_size) == (
        "n",
        "https://l.example",
        "l.example",
        512,
    )
    assert static.poll_interval == dt.timedelta(seconds=10)
    assert (static.start_index, rfc.start_index) == (123456789, 0)
    assert (rfc.name, rfc.kind, rfc.origin, rfc.batch_size) == (
        "https://r.example",
        "rfc6962",
        None,
        4096,
    )
    assert rfc.poll_interval == dt.timedelta(seconds=30)
    env = {"OCSP_RESPONDER_CT_FOLLOW_IN_SERVE": "false"}
    assert not load_config(path, env).ct_follow_in_serve


def one_ct_log(tmp_path: Path, line: str) -> Path:
    """A configuration with one static CT log and ``line`` added to its table."""
    path = tmp_path / "c.toml"
    path.write_text(
        f"[[ct_logs]]\nurl = 'https://l.example/'\nkind = 'static'\npublic_key = 'AAAA'\n{line}\n"
    )
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "must be between 0 and 2\\^63 - 1"),
        (str(2**63), "must be between 0 and 2\\^63 - 1"),
        ("true", "expected an integer"),
    ],
)
def test_ct_start_index_is_a_leaf_index(tmp_path: Path, value: str, message: str) -> None:
    path = one_ct_log(tmp_path, f"start_index = {value}")
    with pytest.raises(ConfigError, match=rf"ct_logs\[0\]\.start_index: {message}"):
        load_config(path, {})


@pytest.mark.parametrize("interval", ["0s", "6m", "1h"])
def test_ct_poll_interval_must_fit_the_15_minute_bound(tmp_path: Path, interval: str) -> None:
    """A lost recording is answered only once the follower polls its log: an interval of
    an hour was accepted and left BR 4.9.9's 15 minutes unmet; 0 polled without pause."""
    path = one_ct_log(tmp_path, f"poll_interval = '{interval}'")
    with pytest.raises(ConfigError, match=r"ct_logs\[0\]\.poll_interval: must be more than 0"):
        load_config(path, {})
    path.write_text(path.read_text().replace(interval, "5m"))
    assert load_config(path, {}).ct_logs[0].poll_interval == dt.timedelta(minutes=5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope = 1\n", "unknown configuration keys: nope"),
        ('response_validity = "11d"\n', "between 8h and 10d"),
        ('response_validity = "4d"\nrefresh_margin = "4h"\n', ">= 8h"),
        ('response_validity = "10d"\nrefresh_margin = "2d"\n', "4 days after thisUpdate"),
        ('listen = "nowhere"\n', "listen: expected host:port"),
        ('path_prefix = "ocsp"\n', "must start with '/'"),
        ('ocsp_http_server = "hypercorn"\n', 'ocsp_http_server: must be "native" or "uvicorn"'),
        ("store_lookup_queue_limit = 0\n", "store_lookup_queue_limit: must be positive"),
        ('log_level = "loud"\n', "log_level: expected one of debug, info"),
        (
            'database_url = "postgresql://u@127.0.0.1:notaport/x"\n',
            "database_url: not a valid PostgreSQL URL",
        ),
        ('database_url = "postgresql://u@127.0.0.1:99999/x"\n', "database_url: not a valid"),
        ('database_url = "mysql://u@h/x"\n', "database_url: expected a postgresql:// URL"),
        ('replica_urls = ["postgresql://h:0x/x"]\n', "replica_urls[0]: not a valid"),
        (
            "[[issuers]]\nname = 'r1'\ncertificate = 'a.pem'\nkey = 'a.key'\n"
            "[[issuers]]\nname = 'r1'\ncertificate = 'b.pem'\nkey = 'b.key'\n",
            "issuers[1].name: 'r1' is already the name of issuers[0]",
        ),
        ("[[issuers]]\nname = 'x'\n", "'certificate'"),
        ("[[issuers]]\ncertificate = 'x.pem'\n", "delegated responder"),
        ("listen = [\n", "invalid TOML"),
        ("[[ct_logs]]\nurl = 'http://l'\nkind = 'static'\n", "'public_key' is required"),
        ("[[ct_logs]]\nurl = 'u'\nkind = 'x'\npublic_key = 'k'\n", "ct_logs[0].kind"),
        (
            "[[ct_logs]]\nurl = 'u'\nkind = 'static'\npublic_key = 'k'\nbatch_size = 0\n",
            "ct_logs[0].batch_size: must be at least 1",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path, {})
    assert message in str(info.value)


def test_key_file_mode_refused(tmp_path: Path, demo_ca) -> None:  # type: ignore[no-untyped-def]
    from tests.support import issuer_files

    files = issuer_files("m", demo_ca, tmp_path)
    (files.directory / "responder.key").chmod(0o644)
    path = tmp_path / "c.toml"
    path.write_text(files.config_table())
    with pytest.raises(ConfigError, match="must not be readable by group or others"):
        load_config(path, {}).load_issuers()


def test_delegated_profile_enforced(tmp_path: Path, demo_ca) -> None:  # type: ignore[no-untyped-def]
    """A responder certificate without id-kp-OCSPSigning and nocheck is refused at start."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from tests.support import issuer_files

    files = issuer_files("p", demo_ca, tmp_path)
    now = dt.datetime.now(dt.UTC)
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bad responder")]))
        .issuer_name(demo_ca.ca_cert.subject)
        .public_key(demo_ca.responder_key.public_key())
        .serial_number(12345)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("x.test")]), False)
        .sign(demo_ca.ca_key, hashes.SHA256())
    )
    (files.directory / "responder.pem").write_bytes(bad.public_bytes(serialization.Encoding.PEM))
    path = tmp_path / "c.toml"
    path.write_text(files.config_table())
    with pytest.raises(ConfigError) as info:
        load_config(path, {}).load_issuers()
    message = str(info.value)
    assert "BR 7.1.2.8" in message
    for problem in (
        "id-kp-OCSPSigning",
        "nocheck",
        "keyUsage",
        "authorityKeyIdentifier",
        "SubjectAlternativeName",
    ):
        assert problem in message, problem


def test_cli_reports_config_errors_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('response_validity = "30d"\n')
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("ocsp-responder: error: response_validity")
    assert "Traceback" not in result.stderr
    path.write_text("")
    result = subprocess.run(
        [
            str(VENV_BIN / "ocsp-responder"),
            "migrate",
            "--config",
            str(path),
            "--database-url",
            "postgresql://x@127.0.0.1:99999/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("ocsp-responder: error: --database-url: not a valid")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('log_format = "xml"\n', "log_format: expected 'json' or 'text'"),
        ("log_success_sample_every = 0\n", "log_success_sample_every: must be >= 1"),
        ('admin_tls_cert = "a.pem"\n', "admin_tls_cert and admin_tls_key go together"),
        ('admin_client_ca = "ca.pem"\n', "admin_client_ca needs admin_tls_cert"),
        ('health_check_interval = "0s"\n', "health_check_interval: must be at least 1s"),
        ('refresh_deadline_slack = "2d"\n', "refresh_deadline_slack: must be shorter"),
        ('ocsp_keep_alive_timeout = "0s"\n', "ocsp_keep_alive_timeout: must be between 1s"),
        ('ocsp_request_read_timeout = "2h"\n', "ocsp_request_read_timeout: must be between"),
        (
            'ocsp_http_server = "uvicorn"\nocsp_request_read_timeout = "5s"\n',
            "ocsp_request_read_timeout: only the native server has it",
        ),
    ],
)
def test_operations_keys_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, {})


def test_operations_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'log_format = "JSON"\nadmin_tls_cert = "a.pem"\nadmin_tls_key = "a.key"\n'
        'admin_client_ca = "ca.pem"\nhealth_check_interval = "5s"\n'
        "readiness_requires_fresh_responses = false\n"
    )
    cfg = load_config(path, {"OCSP_RESPONDER_REFRESH_DEADLINE_SLACK": "1h"})
    assert cfg.log_format == "json" and cfg.admin_client_ca == tmp_path / "ca.pem"
    assert cfg.health_check_interval == dt.timedelta(seconds=5)
    assert cfg.refresh_deadline_slack == dt.timedelta(hours=1)
    assert cfg.readiness_requires_fresh_responses is False
    # default slack: 6h, or a quarter of a short margin
    short = load_config(
        None, {"OCSP_RESPONDER_RESPONSE_VALIDITY": "8h", "OCSP_RESPONDER_REFRESH_MARGIN": "4h"}
    )
    assert short.refresh_deadline_slack == dt.timedelta(hours=1)
    assert load_config(None, {}).refresh_deadline_slack == dt.timedelta(hours=6)


def test_ocsp_port_timeouts(tmp_path: Path) -> None:
    defaults = load_config(None, {})
    assert defaults.ocsp_keep_alive_timeout == dt.timedelta(seconds=5)
    assert defaults.ocsp_request_read_timeout == dt.timedelta(seconds=10)
    path = tmp_path / "c.toml"
    path.write_text('ocsp_keep_alive_timeout = "2m"\n')
    cfg = load_config(path, {"OCSP_RESPONDER_OCSP_REQUEST_READ_TIMEOUT": "3s"})
    assert cfg.ocsp_keep_alive_timeout == dt.timedelta(minutes=2)
    assert cfg.ocsp_request_read_timeout == dt.timedelta(seconds=3)


def test_store_lookup_queue_limit(tmp_path: Path) -> None:
    assert load_config(None, {}).store_lookup_queue_limit == 4096
    path = tmp_path / "c.toml"
    path.write_text("store_lookup_queue_limit = 100\n")
    assert load_config(path, {}).store_lookup_queue_limit == 100


DURATION_KEYS = [key for key, parse in KNOWN_KEYS.items() if parse is parse_duration]


@pytest.mark.parametrize("key", DURATION_KEYS)
def test_every_duration_key_refuses_out_of_range_values_in_one_line(
    tmp_path: Path, key: str
) -> None:
    """nan, inf, negative and overflowing durations (TOML and environment) were accepted
    (a negative cdn_purge_timeout, max_age, replica_max_lag...) or escaped as a bare
    ValueError/OverflowError traceback from timedelta."""
    path = tmp_path / "c.toml"
    for toml_value in ("nan", "inf", "-inf", "-1", "-0.5", "9223372036854775807", '"9999999999d"'):
        path.write_text(f"{key} = {toml_value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, {})
        assert str(info.value).startswith(f"{key}: "), (toml_value, info.value)
    for env_value in ("9" * 30, "99999999999999999d", "-5s", "nan"):
        with pytest.raises(ConfigError) as info:
            load_config(None, {f"OCSP_RESPONDER_{key.upper()}": env_value})
        assert str(info.value).startswith(f"{key}: "), (env_value, info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('admin_token_file = "a\\u0000b"\n', "admin_token_file: a path cannot contain a NUL"),
        ('data_dir = "a\\u0000b"\n', "data_dir: a path cannot contain a NUL"),
        (
            "[[issuers]]\ncertificate = 'c.pem'\nkey = 'k.key'\nresponders = 5\n",
            "issuers[0].responders: expected a list",
        ),
        (
            "[[ct_logs]]\nurl = 'u'\nkind = 'static'\npublic_key = 'k'\npoll_interval = nan\n",
            "ct_logs[0].poll_interval: expected a duration",
        ),
    ],
)
def test_malformed_values_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    """These escaped as ValueError (NUL in a path) or TypeError (a non-list responders)."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(message)


def test_cli_reports_an_overflowing_duration_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_age = inf\n")
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OCSP_RESPONDER_CDN_PURGE_TIMEOUT": "-1"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("ocsp-responder: error: max_age: expected a duration")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_an_empty_database_url_is_refused_not_embedded(tmp_path: Path) -> None:
    """An empty OCSP_RESPONDER_DATABASE_URL (an unset variable in a deploy template) meant
    "no database_url": `migrate` created an embedded database under data_dir and recording
    went there, a throwaway copy the real responders never read."""
    path = tmp_path / "c.toml"
    path.write_text('data_dir = "data"\n')
    for environ, text in (({"OCSP_RESPONDER_DATABASE_URL": ""}, ""), ({}, 'database_url = " "\n')):
        path.write_text('data_dir = "data"\n' + text)
        with pytest.raises(ConfigError, match=r"^database_url: is empty"):
            load_config(path, environ)
    path.write_text('data_dir = "data"\n')
    result = subprocess.run(
        [str(VENV_BIN / "ocsp-responder"), "migrate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OCSP_RESPONDER_DATABASE_URL": ""},
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("ocsp-responder: error: database_url: is empty")
    assert not (tmp_path / "data" / "postgres").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[cdn_purge]]\nurl = 'http://edge/{serial}'\nmethod = 'FOO BAR'\n",
            "cdn_purge[0].method: not an HTTP method: 'FOO BAR'",
        ),
        ("refresher_concurrency = 100000\n", "refresher_concurrency: must be at most 4"),
        ("refresher_batch_size = 9223372036854775807\n", "refresher_batch_size: must be at most"),
    ],
)
def test_values_that_would_fail_at_run_time_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    """Accepted before: every CDN purge failed, 100,000 refresher workers queued recording
    behind them for pool connections (5 s each), a 2^63-row batch failed every refresh."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(message)


def test_ct_log_table_refuses_unknown_keys(tmp_path: Path) -> None:
    """Like [[issuers]] and [[cdn_purge]]: a misspelt key (``poll_interval_`` for a 1m
    poll) was ignored and the default kept, with nothing said."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[[ct_logs]]\nurl = 'https://l.example/'\nkind = 'static'\npublic_key = 'AAAA'\n"
        "pol_interval = '1m'\n"
    )
    with pytest.raises(ConfigError, match=r"^ct_logs\[0\]: unknown keys pol_interval$"):
        load_config(path, {})


def test_worker_hang_timeout(tmp_path: Path) -> None:
    """The loop watchdog's timeout (responder/loop_watchdog.py): 30 s by default, 0 turns
    it off, anything else between 5 s (a GC pause must not look like a hang) and 10 min."""
    assert load_config(None, {}).worker_hang_timeout == dt.timedelta(seconds=30)
    path = tmp_path / "c.toml"
    path.write_text('worker_hang_timeout = "2m"\n')
    assert load_config(path, {}).worker_hang_timeout == dt.timedelta(minutes=2)
    env = {"OCSP_RESPONDER_WORKER_HANG_TIMEOUT": "0"}
    assert load_config(path, env).worker_hang_timeout == dt.timedelta(0)
    for value in ('"4s"', '"11m"', "1"):
        path.write_text(f"worker_hang_timeout = {value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, {})
        assert str(info.value) == "worker_hang_timeout: must be 0 (off) or between 5s and 10m"
