"""Independent references for the tests: advantages and baselines written as plain Python loops over floats,
from the closed forms of docs/math.md §3 (not from ``opdlab.core.divergences``), so a test compares opdlab's
vectorised code against a second computation rather than against itself."""
import math

# f(u) and w_f(u) = -f(u) + u f'(u) as functions of L = log u (docs/math.md §3)
CLOSED_FORMS = {
    "reverse_kl": (lambda L: -L, lambda L: L - 1.0),
    "forward_kl": (lambda L: math.exp(L) * L, lambda L: math.exp(L)),
    "jsd": (lambda L: 0.5 * (math.exp(L) * L - (1 + math.exp(L)) * math.log((1 + math.exp(L)) / 2)),
            lambda L: 0.5 * math.log((1 + math.exp(L)) / 2)),
    "hellinger": (lambda L: (math.exp(L / 2) - 1) ** 2, lambda L: math.exp(L / 2) - 1),
}


def token_advantage(name, method, L):
    f, w = CLOSED_FORMS[name]
    return -f(L) if method == "opd" else w(L)


def naive_advantages(name, method, gamma, baseline, ls_BT, lt_BT, mask_BT, ls_BTV=None, lt_BTV=None,
                     group_size=None, clip=None):
    """``(A, n_clipped)`` as nested lists: A_t = a(u_t) - sum_{s>t, mask_s} gamma^(s-t) f(u_s) - b_t on unmasked
    tokens, 0 elsewhere; b from ``baseline`` ("none", "expected", "loo")."""
    f = CLOSED_FORMS[name][0]
    ls, lt, mask = ls_BT.tolist(), lt_BT.tolist(), mask_BT.tolist()
    B, T = len(ls), len(ls[0])
    clamp = (lambda L: L) if clip is None else (lambda L: max(-clip, min(clip, L)))
    L = [[clamp(lt[b][t] - ls[b][t]) for t in range(T)] for b in range(B)]
    n_clipped = sum(1 for b in range(B) for t in range(T)
                    if mask[b][t] > 0 and clamp(lt[b][t] - ls[b][t]) != lt[b][t] - ls[b][t])
    A = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            future = sum(gamma ** (s - t) * f(L[b][s]) for s in range(t + 1, T) if mask[b][s])
            A[b][t] = token_advantage(name, method, L[b][t]) - future
            if baseline == "expected":
                ps, pt = ls_BTV[b, t].tolist(), lt_BTV[b, t].tolist()
                A[b][t] -= sum(math.exp(ps[a]) * token_advantage(name, method, clamp(pt[a] - ps[a]))
                               for a in range(len(ps)))
    if baseline == "loo":
        G = group_size or B
        out = [[0.0] * T for _ in range(B)]
        for b in range(B):
            group = range(b - b % G, b - b % G + G)
            for t in range(T):
                others = [A[j][t] for j in group if j != b and mask[j][t]]
                if mask[b][t]:
                    out[b][t] = A[b][t] - (sum(others) / len(others) if others else 0.0)
        A = out
    return A, n_clipped
