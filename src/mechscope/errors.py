"""Exceptions raised by mechscope. Each message names the problem and the nearest valid choice."""


class MechscopeError(Exception):
    """Base class of every mechscope error."""


class ConfigError(MechscopeError, ValueError):
    """A model configuration that cannot describe a valid transformer, or an unsupported option."""


class HookError(MechscopeError, ValueError):
    """A hook was given or returned something invalid (wrong shape, dtype, device or type)."""


class HookNameError(MechscopeError, KeyError):
    """An unknown hook-point or cache name."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class InputError(MechscopeError, ValueError):
    """Model input of the wrong type, shape or content."""


class ShapeError(InputError, AssertionError, RuntimeError):
    """Tensors whose shapes do not fit together. It is also an `AssertionError` and a
    `RuntimeError`, the classes TransformerLens and torch raise for the same mistakes, so code
    written against either catches it."""


class LoadError(MechscopeError, RuntimeError):
    """A model, tokenizer or weight file could not be loaded."""


class WeightConversionError(LoadError):
    """A checkpoint's keys or shapes do not match what the family adapter expects."""
