"""The ``tether`` command: configuration errors, application loading, admin Redis lookup, and
``serve`` with its embedded Redis as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tether.server import cli
from tether.server.app import create_app
from tether.server.data.live import COMMIT_BATCH
from tether.server.redis.connection import auto_pipeline
from tether.server.settings import MAX_READ_CACHE_PENDING_COMMITS, Settings, SettingsError

from tests.harness import (
    FAST_ARGON2_ENV,
    REPO_ROOT,
    ServerProcess,
    child_pids,
    free_port,
    pid_alive,
    wait_pid_gone,
)


def run_tether(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m tether ARGS`` as a real process, with no TETHER_* from the caller."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TETHER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------- configuration errors


def test_bad_environment_value_exits_2_naming_the_variable() -> None:
    result = run_tether("serve", env={"TETHER_ACCESS_TTL": "abc"})
    assert result.returncode == 2
    assert result.stderr.startswith("tether: TETHER_ACCESS_TTL:")
    assert "abc" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_redis_url_is_refused_without_showing_its_password() -> None:
    result = run_tether("serve", env={"TETHER_REDIS_URL": "http://:s3cret-pw@10.0.0.1:6379/0"})
    assert result.returncode == 2
    assert result.stderr.startswith("tether: TETHER_REDIS_URL: unsupported scheme 'http'")
    assert "s3cret-pw" not in result.stderr + result.stdout
    # A password with a character a URL reserves ("/", "#", "?"), pasted unencoded: urlsplit
    # then reads part of it as the port or path, and the URL is refused: still unshown.
    for password in ("s3cr/et-pw", "s3cr#et-pw", "s3cr?et-pw"):
        url = f"redis://app:{password}@10.0.0.1:6379/0"
        result = run_tether("serve", env={"TETHER_REDIS_URL": url})
        assert result.returncode == 2, (password, result.stderr)
        assert result.stderr.startswith("tether: TETHER_REDIS_URL:"), result.stderr
        for part in ("s3cr", "et-pw"):
            assert part not in result.stderr + result.stdout, (password, result.stderr)


def test_out_of_range_flag_exits_2_naming_the_setting() -> None:
    result = run_tether("serve", "--port", "70000")
    assert result.returncode == 2
    assert "TETHER_PORT" in result.stderr and "70000" in result.stderr


def test_flag_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_PORT", "not-a-number")
    # The flag wins, so the bad environment value is never parsed...
    args = cli._build_parser().parse_args(["serve", "--port", "9000"])
    assert cli._load_settings(args, "port").port == 9000
    # ...and without the flag it is.
    args = cli._build_parser().parse_args(["serve"])
    with pytest.raises(SettingsError, match="TETHER_PORT"):
        cli._load_settings(args, "port")


def test_non_integer_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "eighty"]) == 2
    assert "--port" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert cli.main(["serve", "--help"]) == 0
    assert "TETHER_ACCESS_TTL" in capsys.readouterr().out


def test_missing_command_is_a_usage_error() -> None:
    assert cli.main([]) == 2


def test_the_tether_command_joins_the_server_and_client_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``tether`` (tether.cli, also ``python -m tether``) has both sides' commands; the server's
    CLI alone has only its own: the server never imports the client."""
    from tether import cli as tether_cli

    assert tether_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "keys", "sessions", "query", "watch", "call", "login"):
        assert command in out
    assert tether_cli.main(["call", "--help"]) == 0
    assert "mutation" in capsys.readouterr().out
    assert tether_cli.main(["serve", "--port", "eighty"]) == 2  # the server's error handling
    assert "--port" in capsys.readouterr().err
    assert cli.main(["call", "--help"]) == 2


# ------------------------------------------------------------------------- application loading


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("no_such_module_xyz:app", "No module named 'no_such_module_xyz'"),
        ("tether.server.settings:no_such_attr", "has no attribute 'no_such_attr'"),
        ("justamodule", "No module named 'justamodule'"),
        ("tether", "has no attribute 'app' (name the App with tether:ATTR)"),
        ("tether:", "expected MODULE or MODULE:ATTR"),
    ],
)
def test_bad_application_exits_2(spec: str, why: str) -> None:
    result = run_tether("serve", spec, "--redis-url", "redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert f"tether: cannot load application '{spec}': " in result.stderr
    assert why in result.stderr


def test_application_module_that_fails_on_import(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("raise ValueError('boom')\n")
    with pytest.raises(cli.CommandError, match=r"'broken_app:app': ValueError: boom"):
        cli.load_application("broken_app:app")


def test_application_loads_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "my_tether_app.py").write_text(
        "from tether.server.data.functions import App\n"
        "class Registry:\n    app = App('mine')\n    other = object()\n"
    )
    loaded = cli.load_application("my_tether_app:Registry.app")
    assert loaded is sys.modules["my_tether_app"].Registry.app
    # Anything but an App is refused at start-up, naming the spec.
    with pytest.raises(cli.CommandError, match=r"my_tether_app:Registry\.other"):
        cli.load_application("my_tether_app:Registry.other")


# ------------------------------------------------------------------------- admin Redis lookup


def test_admin_redis_url_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "redis.url").write_text("redis://127.0.0.1:1111/0\n")
    monkeypatch.setenv("TETHER_DATA_DIR", str(data_dir))
    assert cli.admin_redis_url(Settings.load()) == "redis://127.0.0.1:1111/0"
    monkeypatch.setenv("TETHER_REDIS_URL", "redis://127.0.0.1:2222/0")
    assert cli.admin_redis_url(Settings.load()) == "redis://127.0.0.1:2222/0"
    flag = Settings.load({"redis_url": "redis://127.0.0.1:3333/0"})
    assert cli.admin_redis_url(flag) == "redis://127.0.0.1:3333/0"


def test_sessions_revoke_without_any_redis_exits_2(tmp_path: Path) -> None:
    result = run_tether(
        "sessions", "revoke", "--user", "u1", env={"TETHER_DATA_DIR": str(tmp_path / "none")}
    )
    assert result.returncode == 2
    assert "--redis-url" in result.stderr and "TETHER_REDIS_URL" in result.stderr


def test_sessions_revoke_needs_exactly_one_target() -> None:
    assert cli.main(["sessions", "revoke", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert cli.main(["sessions", "revoke", "--user", "u", "--session", "s"]) == 2


# ------------------------------------------------------------------------- commands on the server


def test_keys_rotate_prints_the_new_kid(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    first = run_tether("keys", "rotate", "--keys-file", str(keys_file))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("new signing key ")
    # Without --keys-file: TETHER_KEYS_FILE, else DATA_DIR/keys.json.
    second = run_tether("keys", "rotate", env={"TETHER_KEYS_FILE": str(keys_file)})
    assert second.returncode == 0, second.stderr
    assert second.stdout != first.stdout
    third = run_tether("keys", "rotate", "--data-dir", str(tmp_path / "d"))
    assert third.returncode == 0, third.stderr
    assert (tmp_path / "d" / "keys.json").exists()


def _key_algs(path: Path) -> list[str]:
    return [k["alg"] for k in json.loads(path.read_text())["keys"]]


def test_keys_rotate_alg_flag_and_setting_choose_the_new_keys_algorithm(tmp_path: Path) -> None:
    from tether.server.auth.signing_keys import load_or_create_key_file

    keys_file = tmp_path / "keys.json"
    load_or_create_key_file(keys_file)
    assert _key_algs(keys_file) == ["ES256"]
    # --alg; a change of algorithm is pointed out on stderr.
    rs = run_tether("keys", "rotate", "--keys-file", str(keys_file), "--alg", "RS256")
    assert rs.returncode == 0, rs.stderr
    assert _key_algs(keys_file) == ["RS256", "ES256"]
    assert json.loads(keys_file.read_text())["keys"][0]["kid"] == rs.stdout.split()[-1]
    assert rs.stderr == (
        "tether: note: the signing algorithm changes from ES256 to RS256; "
        "tokens of the ES256 keys verify until those keys leave the set\n"
    )
    # The setting, when no --alg is given...
    env = {"TETHER_SIGNING_ALGORITHM": "RS256"}
    same = run_tether("keys", "rotate", "--keys-file", str(keys_file), env=env)
    assert same.returncode == 0, same.stderr
    assert same.stderr == ""  # RS256 after RS256: nothing to point out
    assert _key_algs(keys_file) == ["RS256", "RS256", "ES256"]
    # ...and --alg beats it.
    es = run_tether("keys", "rotate", "--keys-file", str(keys_file), "--alg", "ES256", env=env)
    assert es.returncode == 0, es.stderr
    assert _key_algs(keys_file) == ["ES256", "RS256", "RS256"]
    # Without either: ES256, the default.
    default = run_tether("keys", "rotate", "--keys-file", str(keys_file))
    assert default.returncode == 0, default.stderr
    assert _key_algs(keys_file) == ["ES256", "ES256", "RS256"]


def test_keys_rotate_ignores_unrelated_settings(tmp_path: Path) -> None:
    # A rotation reads the key file's location and the algorithm; a bad value of any other
    # setting in the shell (here the port) must not stop it, as it stops `serve`.
    keys_file = tmp_path / "keys.json"
    env = {"TETHER_PORT": "not-a-port", "TETHER_ACCESS_TTL": "0"}
    rotated = run_tether("keys", "rotate", "--keys-file", str(keys_file), env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("new signing key ")
    assert json.loads(keys_file.read_text())["keys"][0]["kid"] == rotated.stdout.split()[-1]
    # Its own settings are still checked.
    env["TETHER_SIGNING_ALGORITHM"] = "HS256"
    refused = run_tether("keys", "rotate", "--keys-file", str(keys_file), env=env)
    assert refused.returncode == 2
    assert "TETHER_SIGNING_ALGORITHM" in refused.stderr


def test_keys_rotate_refuses_an_unknown_algorithm(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    flag = run_tether("keys", "rotate", "--keys-file", str(keys_file), "--alg", "HS256")
    assert flag.returncode == 2
    assert "--alg" in flag.stderr
    env = {"TETHER_SIGNING_ALGORITHM": "HS256"}
    setting = run_tether("keys", "rotate", "--keys-file", str(keys_file), env=env)
    assert setting.returncode == 2
    assert setting.stderr == (
        "tether: TETHER_SIGNING_ALGORITHM: must be ES256 or RS256, got 'HS256'\n"
    )
    assert not keys_file.exists()


def test_sessions_revoke_finds_the_redis_by_flag(redis_url: str) -> None:
    result = run_tether(
        "sessions", "revoke", "--session", "no-such-session", "--redis-url", redis_url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ended 0 session(s)"


def test_sessions_revoke_takes_ids_that_begin_with_a_dash(redis_url: str) -> None:
    """About one id in 64 (secrets.token_urlsafe) begins with ``-``; argparse alone would take
    it for an option. A forgotten id is still a usage error."""
    for option in ("--session", "--user"):
        result = run_tether("sessions", "revoke", option, "-Ab3_x9", "--redis-url", redis_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ended 0 session(s)"
    forgot = run_tether("sessions", "revoke", "--session", "--redis-url", redis_url)
    assert forgot.returncode == 2, forgot.stdout


def test_sessions_revoke_with_a_stale_url_file_exits_1(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    password = "stale-password-0123456789abcdef"
    (data_dir / "redis.url").write_text(f"redis://:{password}@127.0.0.1:{free_port()}/0\n")
    result = run_tether(
        "sessions", "revoke", "--user", "u1", env={"TETHER_DATA_DIR": str(data_dir)}
    )
    assert result.returncode == 1
    assert result.stderr.startswith("tether: cannot reach Redis at redis://:***@127.0.0.1:")
    assert password not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_with_embedded_redis_stops_it_on_signal(
    tmp_path: Path, server_env: dict[str, str], sig: signal.Signals
) -> None:
    server = ServerProcess(None, env=server_env, tmp_dir=tmp_path / "server")
    server.start()
    try:
        assert server.pid is not None
        url_file = server.data_dir / "redis.url"
        assert url_file.exists(), server.log_text()
        redis_pids = child_pids(server.pid)
        assert len(redis_pids) == 1, redis_pids
        assert "redis-server" in Path(f"/proc/{redis_pids[0]}/cmdline").read_text()

        # An admin command finds the embedded Redis through DATA_DIR/redis.url.
        revoke = run_tether(
            "sessions", "revoke", "--user", "nobody",
            env={"TETHER_DATA_DIR": str(server.data_dir)},
        )  # fmt: skip
        assert revoke.returncode == 0, revoke.stderr
        assert revoke.stdout.strip() == "ended 0 session(s)"

        # The log says where the embedded Redis is, never its password.
        password = (server.data_dir / "redis.password").read_text().strip()
        assert f"on unix socket {server.data_dir.resolve()}/redis.sock" in server.log_text()
        assert password not in server.log_text()

        assert server.stop(sig) == 0, server.log_text()
        assert wait_pid_gone(redis_pids[0], timeout=1), "embedded redis-server left running"
        assert not url_file.exists()
    finally:
        server.kill()
        for pid in child_pids(server.pid or 0):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_servers_share_one_redis_and_one_key_file(
    server_factory: Callable[..., ServerProcess], server_env: dict[str, str]
) -> None:
    first = server_factory()
    second = server_factory()
    assert first.port != second.port
    jwks = [httpx.get(s.base_url + "/.well-known/jwks.json").json() for s in (first, second)]
    assert jwks[0] == jwks[1]
    assert Path(server_env["TETHER_KEYS_FILE"]).exists()
    assert first.stop() == 0
    # The other instance is unaffected, and so is the Redis it shares.
    assert httpx.get(second.base_url + "/readyz").status_code == 200


# ------------------------------------------------------------------------- client commands

PASSWORD = "correct horse battery"


def client_cli(
    server: ServerProcess, token_file: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``tether ARGS --url … --token-file …`` against ``server``, as a real process."""
    return run_tether(
        *args,
        "--url",
        server.ws_url,
        "--token-file",
        str(token_file),
        env={"TETHER_PASSWORD": PASSWORD},
    )


def test_query_prints_the_current_result_once_and_exits(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    token_file = tmp_path / "session.json"
    args = ("--args", '{"name": "once"}')
    first = client_cli(server, token_file, "query", "counter.get", *args)
    assert (first.returncode, first.stdout) == (0, "0\n"), first.stderr
    # Anonymous (no session in the token file), a mutation runs as anonymous: issued before
    # the client knew, it was taken for a signed-in user's and failed unauthenticated.
    bumped = client_cli(server, token_file, "call", "counter.increment", *args)
    assert (bumped.returncode, bumped.stdout) == (0, "1\n"), bumped.stderr
    second = client_cli(server, token_file, "query", "counter.get", *args)
    assert (second.returncode, second.stdout) == (0, "1\n"), second.stderr
    # An error result is printed to stderr, exit code 1, nothing on stdout.
    refused = client_cli(server, token_file, "query", "notes.mine")
    assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
    assert "notes.mine: unauthenticated" in refused.stderr


def test_a_query_called_as_a_mutation_hints_at_query_and_the_reverse_at_call(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    token_file = tmp_path / "session.json"
    called = client_cli(server, token_file, "call", "counter.get", "--args", '{"name": "c"}')
    assert called.returncode == 1
    assert "unknown_function: 'counter.get' is a query, not a mutation" in called.stderr
    assert "hint: counter.get is a query: run `tether query counter.get`" in called.stderr
    for command in ("query", "watch"):
        asked = client_cli(server, token_file, command, "counter.increment")
        assert asked.returncode == 1, asked.stderr
        assert "'counter.increment' is a mutation, not a query" in asked.stderr
        assert "run it with `tether call counter.increment`" in asked.stderr
    # A name that is neither gets no hint.
    unknown = client_cli(server, token_file, "call", "no.such")
    assert unknown.returncode == 1
    assert "no mutation named 'no.such'" in unknown.stderr and "hint: no.such" not in unknown.stderr


def test_an_ended_session_and_no_session_hint_at_login(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    token_file = tmp_path / "session.json"
    login_hint = f"tether login --url {server.ws_url} --token-file {token_file}"
    email = f"hint-{os.getpid()}-{free_port()}@example.com"
    login = client_cli(server, token_file, "login", "--signup", "--email", email)
    assert login.returncode == 0, login.stderr
    signed_in = client_cli(server, token_file, "query", "whoami")
    assert signed_in.returncode == 0 and "hint:" not in signed_in.stderr, signed_in.stderr

    access_token = json.loads(token_file.read_text())["session"]["access_token"]
    signout = httpx.post(
        server.base_url + "/auth/signout", headers={"Authorization": f"Bearer {access_token}"}
    )
    assert signout.status_code == 204
    ended = client_cli(server, token_file, "query", "whoami")
    assert (ended.returncode, ended.stdout) == (0, "null\n"), ended.stderr
    assert "auth: signed_out (session_revoked)" in ended.stderr
    assert f"hint: the session has ended; to sign in again, run: {login_hint}" in ended.stderr
    # The ended session was forgotten: the next command is anonymous, and says how to sign in.
    anonymous = client_cli(server, token_file, "query", "whoami")
    assert anonymous.returncode == 0, anonymous.stderr
    assert "auth: anonymous" in anonymous.stderr
    assert f"hint: no session in {token_file}; to sign in, run: {login_hint}" in anonymous.stderr


def test_serve_takes_the_app_of_a_module_named_without_attr(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """``tether serve tests.apps.reactive_app`` serves ``tests.apps.reactive_app:app``."""
    server = server_factory(app="tests.apps.reactive_app")
    result = client_cli(
        server, tmp_path / "session.json", "query", "tally.get", "--args", '{"name": "t"}'
    )
    assert (result.returncode, result.stdout) == (0, "0\n"), result.stderr


@pytest.mark.parametrize(
    "name",
    [
        "TETHER_SEND_QUEUE_BYTES",
        "TETHER_MAX_SUBSCRIPTIONS",
        "TETHER_MAX_PENDING_MUTATIONS",
        "TETHER_MAX_RESULT_BYTES",
        "TETHER_HEARTBEAT_TIMEOUT",
        "TETHER_CLOSE_GRACE",
        "TETHER_SEND_TIMEOUT",
        "TETHER_PING_INTERVAL",
    ],
)
def test_connection_limits_must_be_positive(name: str) -> None:
    assert getattr(Settings.load(environ={name: "1"}), name.removeprefix("TETHER_").lower()) == 1
    for bad in ("0", "-5"):
        with pytest.raises(SettingsError, match=f"{name}: must be at least 1"):
            Settings.load(environ={name: bad})


def test_the_connection_result_budget_defaults_to_and_never_exceeds_the_send_limit() -> None:
    # Above the send limit, a transition carrying every result could exceed it (rule 9).
    settings = Settings.load(environ={"TETHER_SEND_QUEUE_BYTES": "5000"})
    assert settings.effective_max_connection_result_bytes == 5000
    name = "TETHER_MAX_CONNECTION_RESULT_BYTES"
    lower = Settings.load(environ={"TETHER_SEND_QUEUE_BYTES": "5000", name: "4000"})
    assert lower.effective_max_connection_result_bytes == 4000
    for bad in ("5001", "0"):
        with pytest.raises(SettingsError, match=f"{name}: must be 1 to TETHER_SEND_QUEUE_BYTES"):
            Settings.load(environ={"TETHER_SEND_QUEUE_BYTES": "5000", name: bad})


def test_the_pipeline_and_pending_commit_bounds_are_checked_and_reach_the_node(
    tmp_path: Path,
) -> None:
    """``TETHER_REDIS_PIPELINE_MAX_COMMANDS`` (at least 1) sizes the Redis client's batches;
    ``TETHER_READ_CACHE_PENDING_COMMITS`` (0 or more) bounds every live-query follower's
    commits held with their documents (the default partition's and the others')."""
    defaults = Settings.load(environ={})
    assert (defaults.redis_pipeline_max_commands, defaults.read_cache_pending_commits) == (64, 256)
    for bad in ("0", "-5"):
        with pytest.raises(
            SettingsError, match="TETHER_REDIS_PIPELINE_MAX_COMMANDS: must be at least 1"
        ):
            Settings.load(environ={"TETHER_REDIS_PIPELINE_MAX_COMMANDS": bad})
    with pytest.raises(
        SettingsError, match="TETHER_READ_CACHE_PENDING_COMMITS: must not be negative, got -1"
    ):
        Settings.load(environ={"TETHER_READ_CACHE_PENDING_COMMITS": "-1"})
    assert Settings.load(environ={"TETHER_READ_CACHE_PENDING_COMMITS": "0"}) is not None
    # Past the commits a follower holds at all, the setting would promise what is never kept.
    assert MAX_READ_CACHE_PENDING_COMMITS == COMMIT_BATCH
    held = {"TETHER_READ_CACHE_PENDING_COMMITS": str(COMMIT_BATCH)}
    assert Settings.load(environ=held).read_cache_pending_commits == COMMIT_BATCH
    with pytest.raises(
        SettingsError, match="TETHER_READ_CACHE_PENDING_COMMITS: must be at most 10000"
    ):
        Settings.load(environ={"TETHER_READ_CACHE_PENDING_COMMITS": str(COMMIT_BATCH + 1)})

    env = {
        **FAST_ARGON2_ENV,
        "TETHER_REDIS_URL": "redis://127.0.0.1:1",  # never reached
        "TETHER_KEYS_FILE": str(tmp_path / "keys.json"),
        "TETHER_REDIS_PIPELINE_MAX_COMMANDS": "3",
        "TETHER_READ_CACHE_PENDING_COMMITS": "5",
    }
    node = create_app(Settings.load(environ=env)).node
    pipeline = auto_pipeline(node.redis)
    assert pipeline is not None and pipeline.max_commands == 3
    assert node.sync.subscriptions.known_values == 5
    assert node.sync.partitions.known_values == 5  # handed to each partition's follower


def test_max_json_depth_is_bounded_both_ways() -> None:
    assert Settings.load(environ={}).max_json_depth == 64
    assert Settings.load(environ={"TETHER_MAX_JSON_DEPTH": "500"}).max_json_depth == 500
    for bad in ("0", "501"):
        with pytest.raises(SettingsError, match="TETHER_MAX_JSON_DEPTH: must be 1-500"):
            Settings.load(environ={"TETHER_MAX_JSON_DEPTH": bad})


# ------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("TETHER_KEYS", "{bad", "not JSON"),
        ("TETHER_KEYS", "[]", "must be a JSON object"),
        ("TETHER_KEYS", "{}", "'refreshSecret' is missing"),
        ("TETHER_KEYS_FILE", "{tmp}", "Is a directory"),
        ("TETHER_KEYS_FILE", "{tmp}/not-json", "not JSON"),
        ("TETHER_DATA_DIR", "{tmp}/not-json/below-a-file", "Not a directory"),
        ("TETHER_ACCESS_TTL", "-5", "must be at least 1"),
        ("TETHER_PORT", "eighty", "expected an integer"),
        ("TETHER_DRAIN_TIMEOUT", "nan", "finite"),
        ("TETHER_MAX_JSON_DEPTH", "0", "must be 1-500"),
        ("TETHER_PUBLIC_URL", "tether.example.com", "is not a URL"),
        ("TETHER_REDIS_URL", "redis://:pw-x9@127.0.0.1:six/0", "port that is not a number"),
        ("TETHER_REDIS_URL", "http://127.0.0.1:6379", "unsupported scheme"),
        ("TETHER_HOST", "999.1.1.1", "cannot listen on"),
        ("TETHER_SIGNING_ALGORITHM", "HS256", "must be ES256 or RS256, got 'HS256'"),
        ("TETHER_SIGNING_ALGORITHM", "rs256", "must be ES256 or RS256, got 'rs256'"),
    ],
)
def test_a_bad_setting_stops_serve_with_one_line_naming_it(
    tmp_path: Path, name: str, value: str, why: str
) -> None:
    (tmp_path / "not-json").write_text("hello\n")
    env = {name: value.replace("{tmp}", str(tmp_path))}
    # A Redis URL that nothing answers: the server must stop before it would need one.
    flags = [] if name == "TETHER_REDIS_URL" else ["--redis-url", "redis://127.0.0.1:1/0"]
    if name == "TETHER_DATA_DIR":
        flags = []  # the embedded Redis is what uses the data directory
    if name != "TETHER_PORT":  # the flag would beat the variable
        flags += ["--port", str(free_port())]
    result = run_tether("serve", *flags, env=env)
    assert result.returncode != 0, result.stderr
    assert result.stderr.startswith(f"tether: {name}: "), result.stderr
    assert why in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "pw-x9" not in result.stderr  # a Redis password is never printed


def test_an_unknown_tether_variable_is_named_with_the_closest_setting(tmp_path: Path) -> None:
    env = {"TETHER_ACCES_TTL": "60", "TETHER_LOGLEVEL": "debug", "TETHER_PASSWORD": "x"}
    result = run_tether("keys", "rotate", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "tether: warning: TETHER_ACCES_TTL is not a setting and is ignored; "
        "did you mean TETHER_ACCESS_TTL?",
        "tether: warning: TETHER_LOGLEVEL is not a setting and is ignored; "
        "did you mean TETHER_LOG_LEVEL?",
    ]
    # TETHER_PASSWORD is read by `tether login`: no warning for it.
    from tether.client.cli import PASSWORD_ENV

    assert PASSWORD_ENV in cli.OTHER_VARIABLES


def test_serve_on_a_port_in_use_says_so_and_how_to_choose_another() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_tether(
            "serve", "--port", str(port), "--redis-url", "redis://127.0.0.1:1/0",
            env={"TETHER_ACCES_TTL": "60"},
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    warning, error = result.stderr.splitlines()
    assert "did you mean TETHER_ACCESS_TTL?" in warning
    assert error == (
        f"tether: TETHER_PORT: port {port} on 127.0.0.1 is already in use (another server "
        "listens there); choose another with --port PORT or TETHER_PORT"
    )
