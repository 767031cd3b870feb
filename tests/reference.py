"""Reference formulas the tests and the benchmarks check the code against, written from the
papers independently of tarflow.py (a plain module: tests/test_tarflow.py and bench/sampling.py
import it).

A guidance rule combines the conditional Gaussian N(mu_c, sigma_c^2) and the null-label one
N(mu_u, sigma_u^2) of a token into the guided N(mu, sigma^2). Here the rules take the standard
deviations (tarflow.GUIDANCE_RULES take alpha = log sigma) and compute in float64. A fork that
adds a rule to tarflow.GUIDANCE_RULES adds its reference to REFERENCE_RULES under the same name:
the guidance tests run every rule against its reference (reference_rule names a missing one).
"""

import torch


def starflow_guidance(mu_c, sigma_c, mu_u, sigma_u, w):
    """STARFlow's guided Gaussian (its transformer_flow.py): the Gaussian proportional to
    p_c^(1 + w) / p_u^w, with sigma_u raised to sigma_c where it is smaller (so that it is
    normalisable):

        s = min(sigma_c / sigma_u, 1)^2,   sigma = sigma_c / sqrt(1 + w - w s),
        mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)

    Returns (mu, sigma) in the dtype of mu_c."""
    dtype = mu_c.dtype
    mu_c, sigma_c, mu_u, sigma_u = (t.double() for t in (mu_c, sigma_c, mu_u, sigma_u))
    s = torch.clamp(sigma_c / sigma_u, max=1.0) ** 2
    sigma = sigma_c / torch.sqrt(1 + w - w * s)
    mu = ((1 + w) * mu_c - w * s * mu_u) / (1 + w - w * s)
    return mu.to(dtype), sigma.to(dtype)


# The reference of every rule of tarflow.GUIDANCE_RULES, by the same name:
# function(mu_c, sigma_c, mu_u, sigma_u, w) -> (mu, sigma)
REFERENCE_RULES = {"starflow": starflow_guidance}


def reference_rule(name):
    """REFERENCE_RULES[name], or an error naming the rule that has no reference formula yet."""
    if name not in REFERENCE_RULES:
        raise LookupError(f"guidance rule {name!r} of tarflow.GUIDANCE_RULES has no reference "
                          f"formula: add one to REFERENCE_RULES in tests/reference.py")
    return REFERENCE_RULES[name]
