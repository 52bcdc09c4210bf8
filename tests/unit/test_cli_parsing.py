"""The CLI's argument parsing, environment checks and table rendering (no server)."""

import pytest

from gpufleet.cli import build_parser, client_from_env, main, table
from gpufleet.common.config import ConfigError, Env


def test_parser_knows_every_command_of_the_design():
    parser = build_parser()
    for argv in (["status"], ["workers"], ["instances", "add", "i", "--provider-instance-id", "p",
                                            "--hostname", "h", "--model", "m"],
                 ["instances", "list"], ["tokens", "rotate", "i"], ["drain", "w"], ["undrain", "w"],
                 ["keys", "create", "n", "--models", "a,b", "--rpm", "5"], ["keys", "list"],
                 ["keys", "revoke", "k"], ["db", "migrate"], ["--json", "status"], ["status", "--json"]):
        args = parser.parse_args(argv)
        assert callable(args.func)
    assert parser.parse_args(["status", "--json"]).json is True


def test_env_errors_name_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="GPUFLEET_CONTROL_PLANE_URL is not set"):
        client_from_env(Env({}))
    with pytest.raises(ConfigError, match="GPUFLEET_ADMIN_TOKEN is not set"):
        client_from_env(Env({"GPUFLEET_CONTROL_PLANE_URL": "http://cp:8003"}))
    with pytest.raises(ConfigError, match="sha256: hash"):
        client_from_env(Env({"GPUFLEET_CONTROL_PLANE_URL": "http://cp:8003", "GPUFLEET_ADMIN_TOKEN": "sha256:ab"}))
    token_file = tmp_path / "admin-token"
    token_file.write_text("gfa_from_a_file\n")
    client = client_from_env(Env({"GPUFLEET_CONTROL_PLANE_URL": "http://cp:8003/",
                                  "GPUFLEET_ADMIN_TOKEN_FILE": str(token_file)}))
    assert client.session.headers["Authorization"] == "Bearer gfa_from_a_file"
    assert client.base_url == "http://cp:8003"


def test_main_exits_2_on_config_errors(monkeypatch, capsys):
    monkeypatch.delenv("GPUFLEET_CONTROL_PLANE_URL", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["status"])
    assert info.value.code == 2
    assert "GPUFLEET_CONTROL_PLANE_URL" in capsys.readouterr().err


def test_table_renders_aligned_columns():
    text = table([{"a": "x", "b": None, "c": True}, {"a": "longer", "b": 1.25, "c": ["m1", "m2"]}],
                 [("a", "A"), ("b", "B"), ("c", "C")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B", "C"]
    assert lines[1].split() == ["x", "-", "yes"] and lines[2].split() == ["longer", "1.2", "m1,m2"]
    assert table([], [("a", "A")]) == "(none)"
