"""Attack budgets and their units.

In Python (`make_attack`, `benchmark`) `eps` and `alpha` are in [0,1] pixel units, as in
torchattacks and RobustBench: pass `4/255`. On the command line (`parse_eps`) a bare
L-inf budget is in 1/255 units, as in the paper and the authors' code (`--eps 4` is
4/255); `4/255` may be written out. L2 budgets are L2 norms of [0,1] images in both.
Values that cannot be meant are rejected with the reading that was probably intended.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional


def format_eps(value: Optional[float], norm: Optional[str] = "Linf") -> str:
    """L-inf budgets as 4/255 where they sit on the 1/255 grid; L2 budgets as plain numbers."""
    if value is None:
        return "-"
    if norm != "Linf":
        return f"{value:.4g}"
    steps = value * 255
    if abs(steps - round(steps)) < 1e-6:
        return f"{int(round(steps))}/255"
    if abs(steps * 4 - round(steps * 4)) < 1e-6:
        return f"{round(steps, 2):g}/255"
    return f"{value:.4g}"


def parse_eps(text, norm: str = "Linf", flag: str = "--eps") -> float:
    """A command-line budget (`flag` is --eps or --alpha, named in errors): bare L-inf numbers
    are in 1/255 units, "a/b" is a fraction.

    `4` and `4/255` both give 4/255 for L-inf; L2 budgets are plain L2 norms ("0.5").
    """
    raw = str(text).strip()
    try:
        if "/" in raw:
            numerator, denominator = raw.split("/")
            value = float(Fraction(numerator.strip())) / float(Fraction(denominator.strip()))
            explicit = True
        else:
            value = float(raw)
            explicit = False
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{flag} {raw!r} is not a number: write e.g. 4 or 4/255") from None
    if not math.isfinite(value) or value <= 0:
        clean = "; for clean accuracy only use --attack none" if flag == "--eps" else " (the step size)"
        raise ValueError(f"{flag} must be > 0, got {raw!r}{clean}")
    if norm == "Linf" and not explicit:
        if value < 1:
            raise ValueError(
                f"{flag} {raw} is ambiguous: L-inf budgets on the command line are in 1/255 units "
                f"({flag} 4 means 4/255), so {raw} would be {raw}/255 = {value / 255:.2g}. "
                f"For {format_eps(value)} write {flag} {value * 255:g} or {flag} {value * 255:g}/255; "
                f"for a budget below 1/255 write it as a fraction, e.g. {flag} {raw}/255"
            )
        value = value / 255
    if norm == "Linf" and value >= 0.5:
        raise ValueError(
            f"{flag} {raw} is {format_eps(value)} of the pixel range: an L-inf budget that large lets the attacker "
            f"turn every image into plain gray. On the command line {flag} is in 1/255 units ({flag} 4 means "
            "4/255); give a value below 127.5"
        )
    return value


def check_eps(eps: float, norm: str, image_size: Optional[int] = None) -> float:
    """Reject budgets in the wrong unit or so large that every image can become every other."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive number in [0,1] pixel units (e.g. 4/255), got {eps!r}")
    if norm == "Linf":
        if eps >= 1:
            raise ValueError(
                f"eps={eps:g} is not in [0,1] pixel units: in Python eps is a fraction of the "
                f"pixel range, as in torchattacks and RobustBench; for {eps:g}/255 pass eps={eps:g}/255"
            )
        if eps >= 0.5:
            raise ValueError(
                f"eps={eps:g} (L-inf) lets the attacker turn every image into plain gray; did you mean eps={eps:g}/255?"
            )
    elif image_size is not None:
        limit = 0.5 * math.sqrt(3 * image_size * image_size)
        if eps >= limit:
            raise ValueError(
                f"L2 eps={eps:g} reaches {limit:.1f}, the distance at which any "
                f"{image_size}x{image_size} image can become plain gray"
            )
    return float(eps)
