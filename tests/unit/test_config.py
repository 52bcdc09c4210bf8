import pytest

from gpufleet.common.config import ConfigError, Env, parse_bind, redact_url
from gpufleet.common.logs import redact


def test_required_missing_names_the_variable_and_an_example():
    with pytest.raises(ConfigError, match=r"CONTROL_PLANE_URL is not set.*http://cp:8003"):
        Env({}).url("CONTROL_PLANE_URL", required=True, example="http://cp:8003")


def test_malformed_int_and_range():
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL_S='ten' is not a whole number"):
        Env({"HEARTBEAT_INTERVAL_S": "ten"}).int("HEARTBEAT_INTERVAL_S", 10)
    with pytest.raises(ConfigError, match="below the minimum"):
        Env({"N": "0"}).int("N", 1, minimum=1)
    assert Env({"N": " 7 "}).int("N", 1) == 7


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_float_refuses_nan_and_infinity(value):
    with pytest.raises(ConfigError, match="is not a finite number"):
        Env({"TARGET": value}).float("TARGET", 4.0, minimum=0.1)
    with pytest.raises(ConfigError, match="is not a finite number"):
        Env({"TARGET": value}).float("TARGET", 4.0)


def test_url_rejects_non_http_and_hides_passwords():
    with pytest.raises(ConfigError) as info:
        Env({"U": "ftp://user:secret@x"}).url("U")
    assert "secret" not in str(info.value)
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"


def test_parse_bind():
    assert parse_bind("B", "127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_bind("B", ":8080") == ("0.0.0.0", 8080)
    assert parse_bind("B", "[::1]:9") == ("::1", 9)
    with pytest.raises(ConfigError):
        parse_bind("B", "8080")


def test_redact_masks_tokens_in_log_lines():
    line = "sent Authorization: Bearer gfw_abcdefghijklmnop to redis://:hunter2@cp:6379"
    cleaned = redact(line)
    assert "abcdefghijklmnop" not in cleaned and "hunter2" not in cleaned
