import pytest

from gpufleet.common.config import ConfigError
from gpufleet.router.config import RouterConfig

BASE = {"GPUFLEET_REDIS_URL": "redis://127.0.0.1:6379/0"}


def test_plain_http_by_default():
    cfg = RouterConfig.from_env(BASE)
    assert (cfg.scheme, cfg.tls_cert_file, cfg.tls_key_file) == ("http", None, None)


def test_tls_needs_both_files(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="set both GPUFLEET_ROUTER_TLS_CERT_FILE and GPUFLEET_ROUTER_TLS_KEY_FILE"):
        RouterConfig.from_env({**BASE, "GPUFLEET_ROUTER_TLS_CERT_FILE": str(cert)})


def test_tls_files_must_be_readable(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"GPUFLEET_ROUTER_TLS_KEY_FILE=.*nope.pem' cannot be read"):
        RouterConfig.from_env({**BASE, "GPUFLEET_ROUTER_TLS_CERT_FILE": str(cert),
                               "GPUFLEET_ROUTER_TLS_KEY_FILE": str(missing)})


def test_tls_files_switch_the_scheme(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("y")
    cfg = RouterConfig.from_env({**BASE, "GPUFLEET_ROUTER_TLS_CERT_FILE": str(cert),
                                 "GPUFLEET_ROUTER_TLS_KEY_FILE": str(key)})
    assert cfg.scheme == "https" and cfg.tls_key_file == str(key)
