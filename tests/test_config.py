import dataclasses

import pytest

from pipecat_orpheus.config import DEFAULT_CONFIG_PATH, Config, load_config
from pipecat_orpheus.errors import ConfigError


def test_repository_yaml_matches_dataclass_defaults():
    """orpheus_config.yaml mirrors the dataclasses: loading it gives the defaults."""
    assert DEFAULT_CONFIG_PATH.exists()
    assert load_config(environ={}) == Config()


def test_yaml_file_values(tmp_path):
    """Values from a YAML file are typed and applied; other keys keep their defaults."""
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9001\nsampling:\n  temperature: 0.3\n  seed: 7\nengine:\n  cuda_graphs: false\n")
    config = load_config(path, environ={})
    assert config.server.port == 9001 and config.sampling.temperature == 0.3 and config.sampling.seed == 7
    assert config.engine.cuda_graphs is False
    assert config.server.host == Config().server.host


def test_empty_yaml_gives_defaults(tmp_path):
    """An empty file is an empty configuration."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path, environ={}) == Config()


def test_env_overrides_yaml_and_cli_overrides_env(tmp_path):
    """Precedence is YAML < ORPHEUS_SECTION_KEY environment < CLI overrides."""
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9001\n  host: 0.0.0.0\n")
    env = {"ORPHEUS_SERVER_PORT": "9002", "ORPHEUS_ENGINE_MAX_SLOTS": "8", "ORPHEUS_API_KEYS": "k1"}
    config = load_config(path, environ=env)
    assert config.server.port == 9002 and config.engine.max_slots == 8 and config.server.host == "0.0.0.0"
    config = load_config(path, overrides={"server.port": 9003, "server.host": None}, environ=env)
    assert config.server.port == 9003 and config.server.host == "0.0.0.0"  # None = flag not given


def test_env_list_and_bool_values():
    """Environment values are parsed as YAML scalars; lists may be comma-separated."""
    env = {"ORPHEUS_VOICES_AVAILABLE": "tara, leo", "ORPHEUS_ENGINE_CUDA_GRAPHS": "false"}
    config = load_config(environ=env)
    assert config.voices.available == ("tara", "leo") and config.engine.cuda_graphs is False


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("server.port", 70000, "range [0, 65535]"),
        ("sampling.temperature", -0.1, "range [0.0, 5.0]"),
        ("sampling.top_p", 0.0, "range (0.0, 1.0]"),
        ("engine.max_slots", 0, "range [1, 4096]"),
        ("engine.max_slots", 2.5, "must be an integer"),
        ("engine.cuda_graphs", "yes", "must be true or false"),
        ("model.dtype", "int8", "not one of auto, bfloat16, float16, float32"),
        ("engine.backend", "vllm", "not one of batched, reference"),
        ("server.port", True, "must be an integer"),
        ("sampling.min_tokens", -1, "range [0, 131072]"),
        ("engine.devices", ["cuda:0", "gpu1"], "'gpu1' is not a device"),
        ("engine.devices", [], "non-empty list"),
    ],
)
def test_bad_value_names_key_and_range(key, value, expect):
    """A bad value fails with ConfigError naming the key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        load_config(overrides={key: value}, environ={})
    assert info.value.key == key
    assert key in str(info.value) and expect in str(info.value)


def test_bad_env_value_names_key():
    """A bad environment value names the config key it maps to."""
    with pytest.raises(ConfigError, match="server.port"):
        load_config(environ={"ORPHEUS_SERVER_PORT": "-1"})


def test_cross_field_checks():
    """Checks across sections: default voice available, ping timeout >= interval, max_tokens <= slot size."""
    with pytest.raises(ConfigError, match="voices.default"):
        load_config(overrides={"voices.default": "bob"}, environ={})
    with pytest.raises(ConfigError, match="ping_timeout_s"):
        load_config(overrides={"server.ping_timeout_s": 1, "server.ping_interval_s": 5}, environ={})
    with pytest.raises(ConfigError, match="sampling.max_tokens"):
        load_config(overrides={"sampling.max_tokens": 4096, "engine.max_tokens_per_slot": 2048}, environ={})
    with pytest.raises(ConfigError, match="engine.devices.*core_process"):
        load_config(overrides={"engine.devices": ["cpu", "cpu"], "engine.core_process": False}, environ={})
    assert load_config(environ={"ORPHEUS_ENGINE_DEVICES": "cuda:0, cuda:1"}).engine.devices == ("cuda:0", "cuda:1")


def test_unknown_key_and_section(tmp_path):
    """Unknown keys and sections are refused by name, from YAML, env or overrides."""
    with pytest.raises(ConfigError, match="server.prot.*unknown key"):
        load_config(overrides={"server.prot": 1}, environ={})
    path = tmp_path / "c.yaml"
    path.write_text("sever:\n  port: 1\n")
    with pytest.raises(ConfigError, match="'sever'.*unknown section"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="engine.slots"):
        load_config(environ={"ORPHEUS_ENGINE_SLOTS": "3"})
    path.write_text("server: 5\n")
    with pytest.raises(ConfigError, match="'server'.*mapping"):
        load_config(path, environ={})


def test_bad_yaml_file(tmp_path):
    """A file that is missing, not YAML, or not a mapping fails with ConfigError on --config."""
    with pytest.raises(ConfigError, match="--config.*cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    path = tmp_path / "bad.yaml"
    path.write_text("server: [port: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(path, environ={})


def test_config_is_frozen():
    """Sections are frozen: a component cannot change the configuration it was given."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
