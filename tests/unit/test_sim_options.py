"""The agreed command line."""

import pytest

from gpufleet.sim.options import parse_args


def test_defaults_match_the_agreed_interface():
    o = parse_args(["facebook/opt-125m"])
    assert (o.host, o.port, o.max_num_seqs, o.seed) == ("127.0.0.1", 8000, 256, 0)
    assert (o.ttft_ms, o.itl_ms, o.prefill_ms_per_token, o.jitter, o.slowdown_per_seq) == (40, 8, 0.02, 0.1, 0.01)
    assert (o.default_max_tokens, o.startup_delay, o.fault_rate, o.enable_fault_api) == (None, 0, 0, False)
    assert not o.listen_while_loading
    assert o.served_names == ("facebook/opt-125m",)
    assert o.keep_alive_timeout == 5  # vLLM's (uvicorn's) idle keep-alive timeout


def test_all_flags():
    o = parse_args(["m", "--host", "0.0.0.0", "--port", "9000", "--served-model-name", "a", "b",
                    "--max-num-seqs", "2", "--api-key", "k", "--seed", "7", "--ttft-ms", "0", "--itl-ms", "1.5",
                    "--prefill-ms-per-token", "0", "--jitter", "0", "--slowdown-per-seq", "0.5",
                    "--default-max-tokens", "3", "--startup-delay", "1", "--fault-rate", "0.5",
                    "--fault-mode", "reset", "--enable-fault-api", "--output-len-range", "4:8",
                    "--keep-alive-timeout", "0.5"])
    assert o.served_names == ("a", "b") and o.api_key == "k" and o.itl_ms == 1.5
    assert (o.fault_mode, o.fault_rate, o.output_len_range) == ("reset", 0.5, (4, 8))
    assert o.keep_alive_timeout == 0.5


def test_api_key_from_environment_like_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert parse_args(["m"]).api_key == "from-env"


@pytest.mark.parametrize("argv, words", [
    ([], "MODEL"),
    (["m", "--max-num-seqs", "0"], "max-num-seqs"),
    (["m", "--jitter", "1.5"], "jitter"),
    (["m", "--fault-rate", "2"], "fault-rate"),
    (["m", "--fault-mode", "explode"], "fault-mode"),
    (["m", "--itl-ms", "fast"], "itl-ms"),
    (["m", "--port", "70000"], "port"),
    (["m", "--output-len-range", "9:3"], "output-len-range"),
    (["m", "--keep-alive-timeout", "-1"], "keep-alive-timeout"),
])
def test_invalid_flags_exit_2_with_a_clear_message(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_step_engine_defaults_keep_the_old_knobs_meaning():
    o = parse_args(["m"])
    assert (o.step_ms, o.step_ms_per_token, o.max_num_batched_tokens, o.block_size) == (8, 0.02, 8192, 16)
    assert (o.kv_cache_tokens, o.enable_prefix_caching, o.time_scale, o.stream_interval) == (65536, True, 1, 1)
    assert o.profile is None
    assert parse_args(["m", "--max-model-len", "200000"]).kv_cache_tokens == 200000   # the default fits one request
    # --itl-ms and --prefill-ms-per-token are the older names of the step costs
    old = parse_args(["m", "--itl-ms", "5", "--prefill-ms-per-token", "0.1"])
    assert (old.step_ms, old.step_ms_per_token) == (5, 0.1)
    assert parse_args(["m", "--itl-ms", "5", "--step-ms", "3"]).step_ms == 3


def test_profile_sets_values_and_explicit_flags_override_them():
    o = parse_args(["m", "--profile", "llama-3.1-8b-h100"])
    assert (o.step_ms, o.step_ms_per_token, o.ttft_ms, o.slowdown_per_seq) == (6.0, 0.06, 0, 0)
    assert (o.max_num_batched_tokens, o.max_num_seqs, o.kv_cache_tokens) == (8192, 1024, 400_000)
    mine = parse_args(["m", "--profile", "llama-3.1-8b-h100", "--kv-cache-tokens", "32768", "--max-num-seqs", "64",
                       "--itl-ms", "7", "--time-scale", "3", "--no-enable-prefix-caching", "--stream-interval", "4"])
    assert (mine.kv_cache_tokens, mine.max_num_seqs, mine.step_ms, mine.step_ms_per_token) == (32768, 64, 7, 0.06)
    assert (mine.time_scale, mine.enable_prefix_caching, mine.stream_interval) == (3, False, 4)


@pytest.mark.parametrize("argv, words", [
    (["m", "--profile", "gpt-9-tpu"], "profile"),
    (["m", "--kv-cache-tokens", "1000"], "--kv-cache-tokens 1000 is smaller than --max-model-len 4096"),
    (["m", "--max-num-batched-tokens", "0"], "max-num-batched-tokens"),
    (["m", "--time-scale", "-1"], "time-scale"),
    (["m", "--stream-interval", "0"], "stream-interval"),
])
def test_invalid_step_engine_flags(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err
