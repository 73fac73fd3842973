"""TapML: carve real operator tests from a model run on a reference, replay them on a target backend.

The public API lives in the submodules (`tapml.carve`, `tapml.store`, `tapml.replay`, ...); this file only
names the version and the project's error type.
"""

from tapml.errors import TapmlError

__version__ = "0.1.0"
__all__ = ["TapmlError", "__version__"]
