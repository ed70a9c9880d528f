"""``assert_unbiased``: the estimator audit as a check for a user's own loss (``opdlab.audit.testing``), under
the name users import it by."""
from opdlab.audit.testing import assert_unbiased

__all__ = ["assert_unbiased"]
