"""Config machinery: YAML with `base:` inheritance, `a.b=value` overrides, one-line errors."""

from framework.config.loader import (
    ConfigError,
    apply_overrides,
    dump_resolved,
    exit_on_config_error,
    load_config,
    load_yaml_tree,
    validate,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "validate",
    "dump_resolved",
    "exit_on_config_error",
    "load_config",
    "load_yaml_tree",
]
