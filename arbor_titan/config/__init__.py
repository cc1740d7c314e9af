"""Config: typed sections (each defined beside its component), TOML with `extends`, CLI overrides.

Import from the submodules: `config.cli` (load_config, parse_cli), `config.loader` (ConfigError,
to_toml), `config.job` (JobConfig). This package itself stays import-free so that any component
can declare its section with `config.fields.option` without pulling in the others.
"""
