"""Checks of GE's constructor arguments, each naming the argument and what
it allows."""
from typing import Tuple, Union

Extent = Union[int, str]
Size2d = Tuple[int, int]

GLOBAL = 'global'


def check_extent(extent: Extent) -> Extent:
    """Validate an extent ratio.

    Args:
        extent (int | str): A power of two >= 2 (the paper uses 2, 4 and 8)
            or ``'global'``.

    Returns:
        int | str: ``extent`` unchanged.

    Raises:
        TypeError: If ``extent`` is neither an int nor a str.
        ValueError: If ``extent`` is an int that is not a power of two >= 2,
            or a str other than ``'global'``.
    """
    allowed = "a power of two >= 2 (the paper uses 2, 4, 8) or 'global'"
    if isinstance(extent, str):
        if extent != GLOBAL:
            raise ValueError(f'extent must be {allowed}, got {extent!r}')
        return extent
    if isinstance(extent, bool) or not isinstance(extent, int):
        raise TypeError(f'extent must be {allowed}, got {extent!r} '
                        f'of type {type(extent).__name__}')
    if extent < 2 or extent & (extent - 1):
        raise ValueError(f'extent must be {allowed}, got {extent}')
    return extent


def to_size2d(size: Union[int, Size2d], name: str) -> Size2d:
    """Turn an int or an (h, w) pair of positive ints into an (h, w) tuple.

    Args:
        size (int | tuple[int, int]): The size.
        name (str): The argument's name, for the error message.

    Returns:
        tuple[int, int]: ``(h, w)``.

    Raises:
        TypeError: If ``size`` is not an int or a pair of ints.
        ValueError: If an entry is < 1.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool)
                       for s in size)):
        raise TypeError(f'{name} must be an int or a pair (h, w) of ints, '
                        f'got {size!r}')
    if min(size) < 1:
        raise ValueError(f'{name} must be positive, got {tuple(size)}')
    return int(size[0]), int(size[1])


def gathered_size(size: Size2d, extent: Extent) -> Size2d:
    """The spatial size of a gather's output for an input of ``size``.

    Args:
        size (tuple[int, int]): Input ``(h, w)``.
        extent (int | str): Extent ratio.

    Returns:
        tuple[int, int]: ``(ceil(h / e), ceil(w / e))``; ``(1, 1)`` for the
        global extent.
    """
    if extent == GLOBAL:
        return 1, 1
    return -(-size[0] // extent), -(-size[1] // extent)


def check_reduction(reduction: int) -> int:
    """Validate a channel reduction ratio.

    Args:
        reduction (int): Ratio >= 1.

    Returns:
        int: ``reduction`` unchanged.

    Raises:
        TypeError: If ``reduction`` is not an int.
        ValueError: If ``reduction`` < 1.
    """
    if isinstance(reduction, bool) or not isinstance(reduction, int):
        raise TypeError(f'reduction must be an int >= 1 (the paper uses 16), '
                        f'got {reduction!r}')
    if reduction < 1:
        raise ValueError(f'reduction must be an int >= 1 (the paper uses 16), '
                         f'got {reduction}')
    return reduction


def check_channels(channels: int, name: str = 'in_channels') -> int:
    """Validate a channel count.

    Args:
        channels (int): Number of channels, >= 1.
        name (str): The argument's name, for the error message.

    Returns:
        int: ``channels`` unchanged.

    Raises:
        ValueError: If ``channels`` is not a positive int.
    """
    if isinstance(channels, bool) or not isinstance(channels,
                                                    int) or channels < 1:
        raise ValueError(f'{name} must be a positive int, got {channels!r}')
    return channels
