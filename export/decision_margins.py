"""Decision margins of MCAR's global-to-local step: which of its discrete decisions a change of the
inputs within a tolerance could flip.

MCAR turns continuous values into integers at two steps (``docs/mcar-localization.md`` §1 step 4 and
§3): the top-N ranking of the global scores, and the interval search on each max-marginal profile
(the sign of ``s − τ``, then the segment holding the maximum, widest first). Near a tie these
steps are discontinuous: two runtimes whose values differ by a few ulps can legitimately decide
differently. An artifact's decision is *explained* when it is the decision the reference makes on
some inputs within ``tolerance`` of the reference's own; this module computes that set.

Both functions take the reference's values (float64 NumPy) and return the reason an artifact's
decision is explained, or ``None`` when no perturbation within the tolerance gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from fastmlr.kernels.interval_search import _apply_minimum_size, default_interval

__all__ = ["IntervalMargins", "explain_ranking"]


def explain_ranking(
    scores: np.ndarray, chosen: np.ndarray, reference: np.ndarray, tolerance: float | np.ndarray
) -> str | None:
    """Why the ranked classes ``chosen`` (``[N]``, best first) can be the top-N of ``scores`` (``[C]``,
    the reference's global scores) moved by at most ``tolerance`` each (a number, or one per class);
    ``None`` if they cannot.

    Feasible when scores ``v`` with ``|v − scores| <= tolerance`` exist that keep ``chosen`` in order
    and every other class at or below the last chosen one (an equal score is a tie, which the
    perturbation can break either way). A greedy pass decides it: each chosen class takes the
    highest value its bound and its predecessor allow."""
    chosen = np.asarray(chosen, dtype=np.int64)
    tolerance = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), scores.shape)
    if len(set(chosen.tolist())) != len(chosen) or chosen.min() < 0 or chosen.max() >= len(scores):
        return None
    ceiling = np.inf
    for c in chosen:
        value = min(ceiling, scores[c] + tolerance[c])
        if value < scores[c] - tolerance[c]:
            return None
        ceiling = value
    others = np.setdiff1d(np.arange(len(scores)), chosen)
    if len(others) and (scores[others] - tolerance[others]).max() > ceiling:
        return None
    differing = [n for n in range(len(chosen)) if chosen[n] != reference[n]]
    n = differing[0] if differing else 0
    a, r = int(chosen[n]), int(reference[n])
    return (f"top-N tie within tolerance at rank {n + 1}: class {a} ({scores[a]:.7g}) and class {r} "
            f"({scores[r]:.7g}) differ by {abs(scores[a] - scores[r]):.3g}")


@dataclass(frozen=True)
class IntervalMargins:
    """The intervals the search of doc §3 can return for a raw profile moved by at most ``tolerance``.

    With ``r = max − min`` of the raw profile, a change of ``tolerance`` per value moves a normalised
    value by at most ``band = 4·tolerance / (r − 2·tolerance)`` (numerator and denominator of the
    min-max normalisation each move by up to ``2·tolerance``). Within that band:

    - a *flat profile* (``r <= 4·tolerance``) can give any interval;
    - a normalised value within ``band`` of τ can take any sign (−1, 0, +1), so a crossing next to it
      may appear or vanish;
    - a value within ``2·band`` of the maximum can become the unique maximum, so its segment wins.

    A candidate segment ``[start, end)`` is reachable when a crossing can be at ``start`` (or
    ``start = 0``), one can be at ``end`` (or ``end = L``), no crossing is forced strictly between, and
    it holds a value that can become the maximum; its interval is the segment after the minimum-size
    checks. The no-crossing default is reachable when no crossing is forced anywhere. Each crossing
    is judged on its own pair of values; where two crossings share an ambiguous value, this may
    accept a combination that would need two signs for that value at once (both near τ, so the
    decision is ambiguous either way)."""

    profile: np.ndarray
    threshold: float
    tolerance: float

    @property
    def spread(self) -> float:
        return float(self.profile.max() - self.profile.min())

    @property
    def band(self) -> float:
        return 4 * self.tolerance / (self.spread - 2 * self.tolerance)

    def _normalised(self) -> np.ndarray:
        """Doc §2 in float32, the arithmetic of the reference's search (so signs at τ agree)."""
        p = self.profile.astype(np.float32)
        return ((p - p.min()) / (p.max() - p.min())).astype(np.float64)

    def reachable(self, tau_band: float, peak_band: float) -> np.ndarray:
        """``[L + 1, L + 1]`` boolean: ``[lo, hi)`` reachable with signs free within ``tau_band`` of τ
        and maxima free within ``peak_band`` of the maximum (indexed ``[lo, hi]``)."""
        s = self._normalised()
        length = len(s)
        can_pos, can_neg = s > self.threshold - tau_band, s < self.threshold + tau_band
        certain = np.sign(s - self.threshold) * ~(np.abs(s - self.threshold) <= tau_band)
        # crossing at i (0 <= i <= L-2): possible, or forced (both values certain, opposite signs)
        possible = (can_pos[:-1] & can_neg[1:]) | (can_neg[:-1] & can_pos[1:])
        forced = certain[:-1] * certain[1:] < 0
        possible_at = np.r_[possible, False, True]  # index L-1: never a crossing; L: the profile's end
        starts_ok = np.r_[True, possible[1:], False, False]  # start 0 always; else at a crossing
        forced_before = np.r_[0, np.cumsum(forced), forced.sum()]  # forced crossings at positions < i
        peak = np.r_[0, np.cumsum(s >= 1 - peak_band)]  # near-maximal values at positions < i
        lo = np.arange(length + 1)[:, None]
        hi = np.arange(length + 1)[None, :]
        # no forced crossing at positions lo+1 .. hi-1 (one there would end or start the segment)
        inner = forced_before[hi] - forced_before[np.minimum(lo + 1, length)]
        candidate = (lo < hi) & starts_ok[lo] & possible_at[hi] & (inner <= 0) & (peak[hi] - peak[lo] > 0)
        if candidate[0, length] and not possible[0]:
            candidate[0, length] = False  # [0, L) needs a crossing at 0, or it is the no-crossing default
        lo_c, hi_c = (torch.from_numpy(v) for v in np.nonzero(candidate))
        lo_f, hi_f = _apply_minimum_size(lo_c, hi_c, length)  # the search's own rule, on every candidate
        out = np.zeros((length + 1, length + 1), dtype=bool)
        out[lo_f.numpy(), hi_f.numpy()] = True
        if not forced.any():
            out[default_interval(length)] = True
        return out

    def explain(self, interval: tuple[int, int]) -> str | None:
        """Why ``interval`` (``[lo, hi)``) is within the margins, or ``None`` when it is not."""
        lo, hi = (int(v) for v in interval)
        length = len(self.profile)
        if not 0 <= lo <= hi <= length:  # empty only from the minimum-size checks at L <= 8 (doc §3)
            return None
        if self.spread <= 4 * self.tolerance:
            return f"flat profile: its range {self.spread:.3g} is within the tolerance"
        band, s = self.band, self._normalised()
        near_tau = np.flatnonzero(np.abs(s - self.threshold) <= band)
        near_peak = np.flatnonzero((s >= 1 - 2 * band) & (s < 1))
        tau_text = peak_text = ""
        if len(near_tau):
            i = near_tau[np.argmin(np.abs(s[near_tau] - self.threshold))]
            tau_text = (f"{len(near_tau)} profile value(s) within {band:.3g} of τ = {self.threshold:g} "
                        f"(closest {s[i]:.7g} at {i})")
        if len(near_peak):
            j = near_peak[np.argmax(s[near_peak])]
            peak_text = f"a near-equal peak {s[j]:.7g} at {j} (maximum 1 at {int(np.argmax(s))})"
        if self.reachable(band, 0.0)[lo, hi]:
            return tau_text or "equal peaks"
        if self.reachable(0.0, 2 * band)[lo, hi]:
            return peak_text or "equal peaks"
        if self.reachable(band, 2 * band)[lo, hi]:
            return f"{tau_text} and {peak_text}"
        return None
