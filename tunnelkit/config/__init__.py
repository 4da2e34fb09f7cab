"""The settings model: every key defined once (:mod:`.keys`), frozen settings (:mod:`.model`), the TOML file (:mod:`.toml_file`)."""
