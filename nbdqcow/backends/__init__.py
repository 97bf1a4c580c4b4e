"""Block backends: the one storage interface every layer implements."""

from nbdqcow.backends.base import BlockBackend, Capabilities, Extent, ExtentFlag

__all__ = ["BlockBackend", "Capabilities", "Extent", "ExtentFlag"]
