"""The synchronous core: ctypes binding, container, packages, input signatures."""

from .container import ConstantInfo, Container, open_container
from .library import ModelLibrary
from .package import ModelFiles, check_package, default_cache_dir, list_models, open_model
from .signature import InputSpec, Signature, parse_signature

__all__ = [
    "ConstantInfo", "Container", "InputSpec", "ModelFiles", "ModelLibrary", "Signature",
    "check_package", "default_cache_dir", "list_models", "open_container", "open_model",
    "parse_signature",
]
