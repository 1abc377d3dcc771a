"""Find a site's mapping from what a user typed: a site config, a mapping file,
a site folder, or an example site's name (``ehrbridge mappings test acme``).

This sits above the site config (it may load one), so it lives with the tools,
not in mappings/, which the site config itself is built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.core.located_yaml import load_located
from ehrbridge.mappings.loader import MAPPING_FILE, SITES_DIR, is_site_config, load_mapping_file
from ehrbridge.mappings.schema import Mapping


@dataclass(frozen=True, slots=True)
class SiteMapping:
    """A mapping found from what a user typed, and the site config around it if any."""

    name: str
    mapping: Mapping
    path: Path  # the file the mapping was read from
    config: SiteConfig | None = None


def resolve_site(target: str | Path) -> SiteMapping:
    """A site config file, a mapping file, a site folder, or an example site's name."""
    path = Path(target)
    if path.is_dir():
        path = path / MAPPING_FILE
    elif not path.exists() and (SITES_DIR / str(target) / MAPPING_FILE).is_file():
        path = SITES_DIR / str(target) / MAPPING_FILE
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in SITES_DIR.iterdir() if p.is_dir()))
        raise ConfigError(
            f"no site mapping at {target!r}: give a site config, a mapping file, a site folder "
            f"or an example site ({known})"
        )
    if is_site_config(load_located(path)):
        config = load_site_config(path)
        source = Path(config.mapping.source) if config.mapping.source else path
        return SiteMapping(config.site, config.mapping, source, config)
    name = path.parent.name if path.name == MAPPING_FILE else path.stem
    return SiteMapping(name, load_mapping_file(path), path)
