"""Record the calls of a module's function in a test."""
from typing import List


def record_calls(monkeypatch, module, name: str) -> List[tuple]:
    """Replace ``module.name`` (for the test) by a wrapper that calls it and
    records each call's first argument's shape.

    Args:
        monkeypatch: pytest's fixture.
        module: The module whose function to wrap.
        name (str): The function's name.

    Returns:
        list[tuple]: The recorded shapes, one per call, in order.
    """
    calls = []
    function = getattr(module, name)

    def recorded(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls
