"""Bridges to other tools: ``integrations.lm_eval`` runs EleutherAI's lm-evaluation-harness over
adapters. Each bridge needs an optional extra and names its pip command when that is missing."""

from __future__ import annotations

from ..errors import ConfigError

LM_EVAL_MISSING = "lm-eval tasks need the lm-eval package: pip install 'adapterkit[eval]'"


def require_lm_eval() -> None:
    """Raise ConfigError with the pip command when lm-eval is not installed, before anything
    loads (a base model takes seconds; the missing package should be said at once)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(LM_EVAL_MISSING) from None
