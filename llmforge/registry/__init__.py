"""The plugin system: hook specs, the pluggy manager and the component registry."""

from llmforge.registry.components import Component, Registry, RegistryError
from llmforge.registry.manager import get_registry, hookimpl

__all__ = ["Component", "Registry", "RegistryError", "get_registry", "hookimpl"]
