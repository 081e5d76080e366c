"""Exceptions raised by mechscope. Each message names the problem and the nearest valid choice."""


class MechscopeError(Exception):
    """Base class of every mechscope error.

    Example:
        >>> try:
        ...     model(torch.tensor([[60]]))  # the doctest model's vocabulary has 50 tokens
        ... except MechscopeError as error:
        ...     print(type(error).__name__, "-", error)
        InputError - token ids must lie in [0, 50), got [60, 60]
    """


class ConfigError(MechscopeError, ValueError):
    """A model configuration that cannot describe a valid transformer, or an unsupported option.

    Example:
        >>> try:
        ...     ms.ModelConfig(d_model=30, n_layers=1, n_heads=4, d_mlp=8, d_vocab=10, n_ctx=8)
        ... except ConfigError as error:
        ...     print(error)
        d_model=30 is not divisible by n_heads=4; set d_head explicitly
    """


class HookError(MechscopeError, ValueError):
    """A hook was given or returned something invalid (wrong shape, dtype, device or type).

    Example:
        >>> first_position_only = lambda activation, *, hook: activation[:, :1]
        >>> try:
        ...     model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", first_position_only)])
        ... except HookError as error:
        ...     print(error)
        hook on 'blocks.0.hook_resid_pre' returned a activation of shape (1, 1, 32), expected (1, 4, 32)
    """


class HookNameError(MechscopeError, KeyError):
    """An unknown hook-point or cache name. It is also a `KeyError`.

    Example:
        >>> try:
        ...     model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pr"])  # doctest: +ELLIPSIS
        ... except HookNameError as error:
        ...     print(error)
        unknown hook point 'blocks.0.hook_resid_pr'; closest valid names: ['blocks.0.hook_resid_pre', ...]
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class InputError(MechscopeError, ValueError):
    """Model input of the wrong type, shape or content.

    Example:
        >>> try:
        ...     model(torch.tensor([[1.5, 2.0]]))
        ... except InputError as error:
        ...     print(error)
        token ids must be an integer tensor, got torch.float32; to feed the residual stream, pass start_at_layer
    """


class ShapeError(InputError, AssertionError, RuntimeError):
    """Tensors whose shapes do not fit together. It is also an `AssertionError` and a
    `RuntimeError`, the classes TransformerLens and torch raise for the same mistakes, so code
    written against either catches it."""


class LoadError(MechscopeError, RuntimeError):
    """A model, tokenizer or weight file could not be loaded.

    Example:
        >>> import tempfile
        >>> try:
        ...     ms.load(tempfile.mkdtemp())
        ... except LoadError as error:
        ...     print(str(error).split(" has ")[1])
        no config.json: not a Hugging Face model directory
    """


class WeightConversionError(LoadError):
    """A checkpoint's keys or shapes do not match what the family adapter expects.

    Example:
        >>> from mechscope.loading.families import gpt2
        >>> try:
        ...     gpt2.convert_weights({"wte.weight": torch.zeros(50, 8)}, model.cfg)
        ... except WeightConversionError as error:
        ...     print(error)
        gpt2: 'wte.weight' has shape (50, 8), expected (50, 32) from the config
    """
