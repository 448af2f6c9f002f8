"""Config machinery: YAML with `base:` inheritance, `a.b=value` overrides, one-line errors."""

from framework.config.loader import (
    ConfigError,
    apply_overrides,
    build,
    dump_resolved,
    exit_on_config_error,
    load_config,
    load_yaml_tree,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "dump_resolved",
    "exit_on_config_error",
    "load_config",
    "load_yaml_tree",
]
