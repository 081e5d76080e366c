"""Exceptions raised by mechscope. Each message names the problem and the nearest valid choice."""


class MechscopeError(Exception):
    """Base class of every mechscope error.

    Example:
        >>> model(torch.tensor([[60]]))  # the doctest model's vocabulary has 50 tokens
        Traceback (most recent call last):
        mechscope.errors.InputError: token ids must lie in [0, 50), got [60, 60]
    """


class ConfigError(MechscopeError, ValueError):
    """A model configuration that cannot describe a valid transformer, or an unsupported option.

    Example:
        >>> ms.ModelConfig(d_model=30, n_layers=1, n_heads=4, d_mlp=8, d_vocab=10, n_ctx=8)
        Traceback (most recent call last):
        mechscope.errors.ConfigError: d_model=30 is not divisible by n_heads=4; set d_head explicitly
    """


class HookError(MechscopeError, ValueError):
    """A hook was given or returned something invalid (wrong shape, dtype, device or type).

    Example:
        >>> first_position_only = lambda activation, *, hook: activation[:, :1]
        >>> hooks = [("blocks.0.hook_resid_pre", first_position_only)]
        >>> model.run_with_hooks(tokens, fwd_hooks=hooks)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.HookError: hook on 'blocks.0.hook_resid_pre' returned a activation of shape (1, 1, 32), ...
    """


class HookNameError(MechscopeError, KeyError):
    """An unknown hook-point or cache name. It is also a `KeyError`.

    Example:
        >>> model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pr"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.HookNameError: unknown hook point 'blocks.0.hook_resid_pr'; closest valid names: [...]
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class InputError(MechscopeError, ValueError):
    """Model input of the wrong type, shape or content.

    Example:
        >>> model(torch.tensor([[1.5, 2.0]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.InputError: token ids must be an integer tensor, got torch.float32; to feed the residual ...
    """


class ShapeError(InputError, AssertionError, RuntimeError):
    """Tensors whose shapes do not fit together. It is also an `AssertionError` and a
    `RuntimeError`, the classes TransformerLens and torch raise for the same mistakes, so code
    written against either catches it."""


class LoadError(MechscopeError, RuntimeError):
    """A model, tokenizer or weight file could not be loaded.

    Example:
        >>> import tempfile
        >>> ms.load(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.LoadError: ... has no config.json: not a Hugging Face model directory
    """


class WeightConversionError(LoadError):
    """A checkpoint's keys or shapes do not match what the family adapter expects.

    Example:
        >>> from mechscope.loading.families import gpt2
        >>> gpt2.convert_weights({"wte.weight": torch.zeros(50, 8)}, model.cfg)
        Traceback (most recent call last):
        mechscope.errors.WeightConversionError: gpt2: 'wte.weight' has shape (50, 8), expected (50, 32) from the config
    """
