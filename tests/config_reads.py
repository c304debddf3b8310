"""Counting the config files a command reads, for the tests that it reads
its config's `base:` chain once: every read goes through
config.yaml_files.read_bounded."""
from pathlib import Path

import xpmodel.config.yaml_files as yaml_files


def count_config_reads(monkeypatch):
    """A list that gets the path of each config file read from now on, in order."""
    reads, read_bounded = [], yaml_files.read_bounded
    monkeypatch.setattr(yaml_files, "read_bounded",
                        lambda file, *rest: reads.append(Path(file)) or read_bounded(file, *rest))
    return reads


def two_level_chain(folder, base, source, settings):
    """(parent, child): folder/parent.yaml over `base` naming data.source
    `source`, and folder/child.yaml over it with the YAML `settings`."""
    parent, child = Path(folder) / "parent.yaml", Path(folder) / "child.yaml"
    parent.write_text(f"base: {base}\ndata:\n  source: {source}\n")
    child.write_text(f"base: parent.yaml\n{settings}")
    return parent, child
