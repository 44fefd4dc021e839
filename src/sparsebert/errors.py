"""One exception type for every user-facing mistake.

Bad input must produce a message that names the problem and the fix, never a stack trace
from deep inside torch. The CLI catches `SparseBertError` and prints only its message.
"""


class SparseBertError(ValueError):
    """A problem with the user's input (path, sparsity, recipe, data, model)."""


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Validate a sparsity level: a fraction in [0, 1)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SparseBertError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        hint = f" (did you mean {value / 100:g}?)" if 1.0 < value < 100.0 else ""
        raise SparseBertError(
            f"{what} must be a fraction in [0, 1), got {value:g}{hint}: "
            "0.9 means 90% of the targeted weights are zero"
        )
    return value
