"""The one generation loop: scoring (``evaluate``), ``adapterkit generate`` and the server all run
their prompts through an ``Engine``.

The engine batches continuously. Each ``step`` prefills newcomers (left-padded, in chunks of at
most ``max_prefill_tokens`` so that a long prompt cannot stall the decoding rows for long), then
decodes every running row by one token. A row leaves the batch, KV cache included, the moment it
finishes; waiting rows take its place at the next step. Each row has its own adapter (or the bare
base), sampling, penalties, stop strings and token budget, and a failure in one row (non-finite
logits, say) ends that row alone. A beam-search row decodes as one batch row per beam, beside
the others; when its beams are re-ranked, their KV cache rows are copied to follow them.

The parts: ``sampling`` (settings, checks, picking a token), ``beams`` (one row's beam search),
``detokenizer`` (tokens to text, stop strings), ``kv`` (the cache's buffers) and ``engine`` (the
loop itself).
"""

from .detokenizer import Detokenizer, silent_ids
from .engine import ACTIVE, PADDING_WORTH_A_FORWARD, Active, Engine, Generation, generate, pad_token_id
from .sampling import (
    MAX_BEAMS,
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SEED_LIMIT,
    Sampling,
    TokenLogprob,
    check_stops,
)

__all__ = [
    "ACTIVE", "MAX_BEAMS", "MAX_LOGPROBS", "MAX_STOP_CHARS", "MAX_STOPS", "MIN_REPETITION_PENALTY", "MIN_TEMPERATURE",
    "PADDING_WORTH_A_FORWARD", "SEED_LIMIT", "Active", "Detokenizer", "Engine", "Generation", "Sampling",
    "TokenLogprob", "check_stops", "generate", "pad_token_id", "silent_ids",
]
