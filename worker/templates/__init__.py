"""Warm templates: per host and shape, a VM saved where its init waits for its instance
config, resumed under a new instance's disks instead of a cold boot (docs/templates.md)."""

from .manager import DEFAULT_SHAPE, TemplateManager
from .store import HostIdentity, Template, TemplateManifest, TemplateShape, TemplateStore

__all__ = [
    "DEFAULT_SHAPE",
    "HostIdentity",
    "Template",
    "TemplateManager",
    "TemplateManifest",
    "TemplateShape",
    "TemplateStore",
]
